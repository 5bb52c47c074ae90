"""Lowering to Triton kernels: the GPU twin of `fusion.lower.lower_to_kernels`.

    res = lower_to_triton(gm, config)      # LowerResult(gm calling TritonKernel modules + ATen, kernels)

It runs the same scheduler (`fusion.schedule`) and kernel IR (`fusion.codegen.prims`) and builds the
same `runtime.KernelSpec` per group as the C++ path (reusing lower.py's helpers), then renders each IR
with `fusion.codegen.triton` instead of C++. The scheduler must accept the graph's device and dtypes
for groups to form (see the integration notes in tests/test_triton.py's module docstring).
"""
from __future__ import annotations

from torch import fx

from fusion import lower as _L
from fusion import schedule as S
from fusion.codegen import prims as P
from fusion.codegen import triton_runtime as TR
from fusion.config import Config


spec_for = _L.kernel_spec  # the runtime spec of one IR, exactly as the C++ path builds it


def build_kernels(gm: fx.GraphModule, cache_dir: str | None = None,
                  dtypes_from: str = "graph") -> list[tuple[P.KernelIR, TR.TritonKernel]]:
    """Schedule gm and compile (render + import; Triton compiles lazily) one TritonKernel per group.

    dtypes_from="graph": outputs have the dtypes of the graph's nodes; "inputs": the promoted dtype of
    the call's float inputs (a graph captured in fp32 then called with fp16/bf16 tensors)."""
    out = []
    groups = [g for g in S.schedule(gm, devices=("cpu", "cuda")) if S.worth_a_kernel(g)]
    for ir, spec in _L.kernel_irs(groups):
        dts = [S.tval(o.node).dtype for o in ir.outputs] if dtypes_from == "graph" else None
        out.append((ir, TR.compile_kernel(ir, spec, cache_dir, out_dtypes=dts)))
    return out


def lower_to_triton(gm: fx.GraphModule, config: Config | None = None, hw=None,
                    dtypes_from: str = "graph") -> _L.LowerResult:
    """Same contract as lower.lower_to_kernels (hw is accepted for symmetry and unused)."""
    config = config or Config()
    built = build_kernels(gm, config.cache_dir, dtypes_from)
    if not built:
        return _L.LowerResult(gm, [])
    irs = [ir for ir, _ in built]
    modules = {ir.name: k for ir, k in built}
    infos = []
    for ir, k in built:
        br, bw, fl, tr = _L._stats(ir)
        infos.append(_L.KernelInfo(ir.name, [m.name for m in ir.members], k.source_path, br, bw, fl, tr,
                                   kind=k.kind, domain=[S.hint(d) for d in ir.D]))
    return _L.LowerResult(_L._rebuild(gm, irs, modules), infos)
