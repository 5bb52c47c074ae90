"""Predicted time of a whole program as it runs: ATen calls, view calls and generated kernels.

    program_cost(gm, kernels=None, program_gm=None) -> [(node name, Cost), ...]
    graph_program_time(gm, hw, kernels=None, program_gm=None) -> seconds
    kernel_info_cost(kernel_info, program_gm=None) -> Cost

`gm` is any FX GraphModule the pipeline produces: the captured ATen graph (eager), the rewritten graph
(fusion ops, codegen="aten") or the lowered one (call_module nodes = generated kernels, described by
`kernels`: name -> fusion.lower.KernelInfo). Each node is its own call, so the roofline max is taken per
node and the node times summed (fusion.costmodel.roofline.Cost.time).
"""
from __future__ import annotations

import operator

import torch

from fusion.costmodel.hardware import HardwareProfile
from fusion.costmodel.ops_table import BASE_FN
from fusion.costmodel.roofline import PARALLEL_GRAIN, Cost, flat_metas, is_view_node, node_cost, node_val, op_cost, shape_of


def kernel_info_cost(k, program_gm=None) -> Cost:
    """Cost of one generated kernel from its lower.KernelInfo (boundary bytes, FLOPs, transcendentals as
    the code generator counted them), one kernel call, one parallel region when its domain reaches the
    parallel grain. The transcendental functions are read off the member nodes in `program_gm` (the graph
    before lowering), weighted by their per-element counts."""
    dom = 1
    for d in getattr(k, "domain", None) or []:
        dom *= int(d)
    c = Cost(bytes_read=float(k.bytes_read), bytes_written=float(k.bytes_written), flops=float(k.flops),
             transcendentals=float(k.transcendentals), calls=1,
             parallel_regions=1.0 if dom >= PARALLEL_GRAIN else 0.0, generated=True)
    if c.transcendentals and program_gm is not None:
        by_name = {n.name: n for n in program_gm.graph.nodes}
        mix: dict[str, float] = {}
        for name in k.nodes:
            n = by_name.get(name)
            if n is None or n.op != "call_function":
                continue
            nc = node_cost(n)
            for fn, cnt in nc.transcendental_mix.items():      # generated code: glibc expf/erff/tanhf
                fn = BASE_FN.get(fn, fn)
                mix[fn] = mix.get(fn, 0.0) + cnt
        total = sum(mix.values())
        if total:
            c.transcendental_mix = {fn: c.transcendentals * v / total for fn, v in mix.items()}
    return c


def rms_norm_reference_cost(ins, outs) -> Cost:
    """fusion.rms_norm NOT lowered runs its eager reference (fusion/dialect/ops.py), six ATen ops:
    pow(x, 2), mean(-1), + eps, rsqrt, x * r, * weight: three full-size intermediates, six calls.
    (op_cost prices the op as the ideal fused kernel, one read + one write: what extraction wants.)"""
    aten = torch.ops.aten
    x = ins[0]
    w = ins[1] if len(ins) > 1 else None
    m = lambda *s: torch.empty(s, dtype=x.dtype, device="meta")        # noqa: E731
    xs = shape_of(x)
    X, R = m(*xs), m(*xs[:-1], 1)
    c = op_cost(aten.pow.Tensor_Scalar, [X], X, (X, 2)) + op_cost(aten.mean.dim, [X], R, (X, [-1], True))
    c = c + op_cost(aten.add.Tensor, [R], R, (R, 1e-6)) + op_cost(aten.rsqrt.default, [R], R, (R,))
    c = c + op_cost(aten.mul.Tensor, [X, R], X, (X, R))
    if w is not None:
        out = outs[0] if outs else X
        c = c + op_cost(aten.mul.Tensor, [out, w], out, (out, w))
    return c


def _runs_reference(n) -> bool:
    """Fused ops whose un-lowered form is a Python reference of several ATen ops (fusion/dialect/ops.py)."""
    ns = getattr(n.target, "namespace", "")
    return ns == "fusion" and getattr(n.target, "_opname", "") == "rms_norm"


def program_cost(gm, kernels: dict | None = None, program_gm=None) -> list[tuple[str, Cost]]:
    """(node name, Cost) of every node of `gm` as it runs: ATen calls (node_cost), view ops (one
    view call each: they are Python dispatches even though they move no data), generated kernels
    (call_module nodes, from `kernels`: name -> lower.KernelInfo)."""
    graph = gm.graph if hasattr(gm, "graph") else gm
    out = []
    for n in graph.nodes:
        if n.op == "call_module" and kernels and n.target in kernels:
            out.append((n.name, kernel_info_cost(kernels[n.target], program_gm)))
        elif n.op == "call_function" and n.target is not operator.getitem:
            if is_view_node(n):
                out.append((n.name, Cost(view_calls=1.0)))
            elif _runs_reference(n):
                ins = [m for a in n.all_input_nodes for m in flat_metas(node_val(a))]
                out.append((n.name, rms_norm_reference_cost(ins, flat_metas(node_val(n)))))
            else:
                out.append((n.name, node_cost(n)))
    return out


def graph_program_time(gm, hw: HardwareProfile, kernels: dict | None = None, program_gm=None) -> float:
    """Predicted seconds of one call of `gm` (an eager ATen graph, a rewritten graph or a lowered one):
    the GraphModule call itself + each node as its own call (roofline max per node, times summed)."""
    return getattr(hw, "graph_call_overhead", 0.0) + sum(c.time(hw) for _, c in program_cost(gm, kernels, program_gm))
