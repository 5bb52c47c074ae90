"""Lowering to Triton kernels: the GPU twin of `fusion.lower.lower_to_kernels`.

    res = lower_to_triton(gm, config)      # LowerResult(gm calling TritonKernel modules + ATen, kernels)

It runs the same scheduler (`fusion.schedule`) and kernel IR (`fusion.codegen.prims`) and builds the
same `runtime.KernelSpec` per group as the C++ path (reusing lower.py's helpers), then renders each IR
with `fusion.codegen.triton` instead of C++. The scheduler must accept the graph's device and dtypes
for groups to form (see the integration notes in tests/test_triton.py's module docstring).
"""
from __future__ import annotations

import torch
from torch import fx

from fusion import lower as _L
from fusion import runtime
from fusion import schedule as S
from fusion.codegen import prims as P
from fusion.codegen import triton_runtime as TR
from fusion.config import Config


def spec_for(ir: P.KernelIR) -> runtime.KernelSpec | None:
    """The runtime spec of one IR, exactly as lower_to_kernels builds it (None: cannot be called)."""
    dsrc = _L._domain_sources(ir)
    if dsrc is None:
        return None
    ins = [_L._input_spec(ir, i) for i in ir.inputs]
    flatten = not ir.has_reduction and any(s.vec for s in ins) and all(
        s.full_shape if s.vec else all(S.is_one(d) for d in S.tval(i.node).shape)
        for s, i in zip(ins, ir.inputs)) and all(o.form == "full" for o in ir.outputs)
    outs = [(o.form, torch.float32 if o.dtype == "f" else torch.bool) for o in ir.outputs]
    return runtime.KernelSpec(R=len(ir.D), dsrc=dsrc, inputs=ins, outputs=outs, flatten=flatten)


def build_kernels(gm: fx.GraphModule, cache_dir: str | None = None,
                  dtypes_from: str = "graph") -> list[tuple[P.KernelIR, TR.TritonKernel]]:
    """Schedule gm and compile (render + import; Triton compiles lazily) one TritonKernel per group.

    dtypes_from="graph": outputs have the dtypes of the graph's nodes; "inputs": the promoted dtype of
    the call's float inputs (a graph captured in fp32 then called with fp16/bf16 tensors)."""
    out = []
    try:                                     # schedule() takes the device types to fuse
        groups = S.schedule(gm, devices=("cpu", "cuda"))
    except TypeError:
        groups = S.schedule(gm)
    for g in groups:
        if not S.worth_a_kernel(g):
            continue
        name = f"{_L._kernel_base_name(g)}_{len(out)}"
        try:
            ir = P.build(g, name)
        except (P.UnsupportedError, KeyError):
            continue
        if not ir.outputs:
            continue
        spec = spec_for(ir)
        if spec is None:
            continue
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
