"""GEMM library choice: fp32 matrix products on the CPU go to the faster of MKL and oneDNN.

ATen's `mm`/`addmm` call MKL's sgemm. On some CPUs another library is much faster at the very same
product: on this machine (AMD EPYC, Zen 5) MKL takes its AVX2 path (~100 GFLOP/s per core) while
oneDNN's AVX-512 kernels reach ~230 (`python -m fusion calibrate` measures both: `gemm_flops`
"float32" and "float32_onednn"). The pass rewrites

    mm(a, permute(w, [1, 0]))            ->  mkldnn._linear_pointwise(a, w, None, "none", [], "")
    addmm(bias, a, permute(w, [1, 0]))   ->  mkldnn._linear_pointwise(a, w, bias, "none", [], "")
    mm(a, b)                             ->  mkldnn._linear_pointwise(a, permute(b, [1, 0]), None, ...)

only when the stored hardware profile says oneDNN is at least `MIN_SPEEDUP` faster, and only for products
big enough that the saving beats oneDNN's larger fixed cost per call (`EXTRA_CALL_S`). The weight is
passed as it is (a view, never packed or copied: seed 000); the result is the same product in fp32
(another summation order: relative differences ~1e-6). Anything else (bmm, other dtypes, CUDA, an
addmm with alpha/beta or a 2-D bias) stays as it is.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx

aten = torch.ops.aten
MIN_SPEEDUP = 1.15
ONEDNN_KEY = "float32_onednn"
#: oneDNN's extra fixed cost per call over ATen's mm (primitive lookup; measured here: 12-13 us for a 32x32
#: product vs 1.4-3.6 us): a product moves only when its predicted saving exceeds it (tiny GEMMs and
#: single-row decode GEMMs below ~4 MFLOP stay on ATen)
EXTRA_CALL_S = 10e-6


def onednn_linear() -> Any:
    """torch.ops.mkldnn._linear_pointwise.default, or None when this torch has no oneDNN."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


def prefers_onednn(hw: Any) -> bool:
    rates = getattr(hw, "gemm_flops", None) or {}
    mkl, dnn = rates.get("float32", 0.0), rates.get(ONEDNN_KEY, 0.0)
    return bool(mkl and dnn and dnn >= MIN_SPEEDUP * mkl) and onednn_linear() is not None


def _worth_it(m: Any, k: int, n: Any, hw: Any) -> bool:
    """Predicted time on oneDNN (its rate + EXTRA_CALL_S) below ATen's (MKL's rate)? Symbolic sizes by their hint."""
    from fusion.costmodel.roofline import to_int

    flops = 2.0 * to_int(m) * k * to_int(n)
    rates = hw.gemm_flops
    return flops / rates["float32"] > flops / rates[ONEDNN_KEY] + EXTRA_CALL_S


def product_seconds(m: int, k: int, n: int, bias: bool, hw: Any) -> tuple[float, str]:
    """Predicted seconds of one fp32 CPU product [m, k] x [k, n] (+ a bias row) as the program will run it after
    this pass: (time, "onednn") when `use_onednn_gemms` would move it (oneDNN's rate + EXTRA_CALL_S), else
    (time, "aten") on ATen's MKL path. The roofline model of fusion/costmodel/roofline.py, calls included."""
    from fusion.costmodel.roofline import op_cost

    def meta(*shape: int) -> torch.Tensor:
        return torch.empty(shape, device="meta")

    x, out = meta(m, k), meta(m, n)
    if prefers_onednn(hw) and k > 0 and _worth_it(m, k, n, hw):
        ins = [x, meta(n, k)] + ([meta(n)] if bias else [])
        return op_cost(onednn_linear(), ins, out).time(hw) + EXTRA_CALL_S, "onednn"
    wt = meta(n, k).t()
    if bias:
        return op_cost(aten.addmm.default, [meta(n), x, wt], out).time(hw), "aten"
    return op_cost(aten.mm.default, [x, wt], out).time(hw), "aten"


def lower_stacked_linears(gm: fx.GraphModule, hw: Any) -> tuple[fx.GraphModule, int]:
    """`fusion.stacked_linear(x, ws, bs)` -> `fusion.dialect.stacked.stacked_linear_impl(x, ws, bs, onednn)`: the same
    function called directly (a custom op's dispatch costs ~7 us a call here), on oneDNN when its merged
    product is worth it by the profile (as for any other GEMM). (gm, how many)."""
    from fusion.dialect.stacked import stacked_linear_impl

    op = torch.ops.fusion.stacked_linear.default
    if not any(n.op == "call_function" and n.target is op for n in gm.graph.nodes):
        return gm, 0
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    count = 0
    dnn = prefers_onednn(hw)
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target is not op:
            continue
        x, ws, bs = n.args
        xv, ov = _val(x), _val(n)
        onednn = bool(dnn and _cpu_fp32_2d(x) and isinstance(ov, torch.Tensor) and isinstance(xv.shape[1], int)
                      and xv.shape[1] > 0 and _worth_it(xv.shape[0], xv.shape[1], ov.shape[1], hw))
        with graph.inserting_before(n):
            new = graph.call_function(stacked_linear_impl, (x, ws, bs, onednn))
        new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        name = n.name
        graph.erase_node(n)
        new._rename(name)
        count += 1
    graph.lint()
    new_gm = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new_gm.meta.update(gm.meta)
    return new_gm, count


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _cpu_fp32_2d(n: Any) -> bool:
    v = _val(n)
    return isinstance(v, torch.Tensor) and v.device.type == "cpu" and v.dtype == torch.float32 and v.dim() == 2


def _weight_of(graph: fx.Graph, b: fx.Node, before: fx.Node) -> fx.Node:
    """A [N, K] view of the [K, N] operand b: the un-transposed tensor when b is one's transpose."""
    if b.target in (aten.permute.default, aten.t.default) and isinstance(b.args[0], fx.Node):
        src = b.args[0]
        dims = b.args[1] if b.target is aten.permute.default else [1, 0]
        if list(dims) == [1, 0] and _cpu_fp32_2d(src):
            return src
    with graph.inserting_before(before):
        w = graph.call_function(aten.permute.default, (b, [1, 0]))
    w.meta["val"] = _val(b).permute(1, 0)
    return w


def use_onednn_gemms(gm: fx.GraphModule, hw: Any) -> tuple[fx.GraphModule, int]:
    """Rewrite fp32 CPU mm/addmm to oneDNN's linear when the profile says it is faster; (gm, count)."""
    if not prefers_onednn(hw):
        return gm, 0
    linear = onednn_linear()
    if not any(n.op == "call_function" and n.target in (aten.mm.default, aten.addmm.default) for n in gm.graph.nodes):
        return gm, 0
    graph = fx.Graph()                      # work on a copy: the input graph may be a fallback of the caller
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    count = 0
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target not in (aten.mm.default, aten.addmm.default):
            continue
        if n.target is aten.mm.default:
            (a, b), bias = n.args[:2], None
            if n.kwargs:
                continue
        else:
            bias, a, b = n.args[:3]
            if n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1 or len(n.args) > 3:
                continue
            bv = _val(bias)
            if not (isinstance(bv, torch.Tensor) and bv.dim() == 1 and bv.dtype == torch.float32
                    and bv.device.type == "cpu" and bv.shape[0] == _val(n).shape[-1]):
                continue
        if not (_cpu_fp32_2d(a) and _cpu_fp32_2d(b) and _cpu_fp32_2d(n)):
            continue
        k = _val(a).shape[1]
        if not isinstance(k, int) or k == 0:   # oneDNN has no empty reduction; a symbolic K stays on ATen
            continue
        if not _worth_it(_val(a).shape[0], k, _val(n).shape[1], hw):
            continue
        w = _weight_of(graph, b, n)
        with graph.inserting_before(n):
            new = graph.call_function(linear, (a, w, bias, "none", [], ""))
        new._rename("linear")                 # reads as what it is in gm.code
        new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        graph.erase_node(n)
        if b is not w and not b.users and b.target in (aten.permute.default, aten.t.default):
            graph.erase_node(b)               # the transpose we looked through, now unused
        count += 1
    if not count:
        return gm, 0
    graph.lint()
    new_gm = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new_gm.meta.update(gm.meta)
    return new_gm, count
