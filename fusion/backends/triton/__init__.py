"""The Triton backend: kernel IRs -> one Triton module per kernel -> a TritonKernel module each.

    modules = build(plan.irs, plan.specs, config)      # name -> runtime.TritonKernel (compiles lazily)

Output dtypes are the graph's (`out_dtypes="graph"`), or the promoted dtype of the call's float inputs
(`"inputs"`: a graph captured in fp32 then called with fp16/bf16 tensors).
"""
from __future__ import annotations

from fusion.config import Config
from fusion.dialect.values import tval
from fusion.lower.kernel_ir import KernelIR
from fusion.lower.specs import KernelSpec


def build(irs: list[KernelIR], specs: list[KernelSpec], config: Config, out_dtypes: str = "graph") -> dict:
    import fusion.backends.triton.attention  # noqa: F401  (fusion.attention -> Triton on CUDA)
    from fusion.backends.triton.runtime import compile_kernel

    modules = {}
    for ir, spec in zip(irs, specs):
        dts = [tval(o.node).dtype for o in ir.outputs] if out_dtypes == "graph" else None
        modules[ir.name] = compile_kernel(ir, spec, config.cache_dir, out_dtypes=dts)
    return modules
