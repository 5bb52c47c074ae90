"""GEMM library choice: each fp32 matrix product on the CPU goes to the library measured fastest at its shape.

ATen's `mm`/`addmm` call MKL's sgemm. On some CPUs another library is much faster at the very same
product, and which one wins depends on the CPU and on the shape: on a Zen 5 MKL takes its AVX2 path
(~100 GFLOP/s per core) while oneDNN's AVX-512 kernels reach ~230; on a Zen 4 MKL wins at a 1024^2 square
and loses 1.4x at BERT's 512x768 by 768x3072. So each product's candidates are timed at its own shape
(`GemmTuner`: fusion/costmodel/tuning.py, remembered per CPU identity and shared across processes) and
the faster one is taken. Without a measurement (no tuner, or its budget spent) the calibrated profile's
rates decide (`gemm_flops` "float32" and "float32_onednn", measured by `python -m fusion calibrate`).
The pass rewrites

    mm(a, permute(w, [1, 0]))            ->  mkldnn._linear_pointwise(a, w, None, "none", [], "")
    addmm(bias, a, permute(w, [1, 0]))   ->  mkldnn._linear_pointwise(a, w, bias, "none", [], "")
    mm(a, b)                             ->  mkldnn._linear_pointwise(a, permute(b, [1, 0]), None, ...)

only when oneDNN measured faster at that product (or, unmeasured, when the profile says oneDNN is at least
`MIN_SPEEDUP` faster and the product is big enough that the saving beats oneDNN's larger fixed cost per
call, `EXTRA_CALL_S`). The weight is
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


#: a measured oneDNN time must be below this fraction of ATen's to move a product (noise margin)
MEASURED_GAIN = 0.97


class GemmTuner:
    """Measured ATen-vs-oneDNN times of fp32 CPU products, by shape and layout (fusion.costmodel.tuning).

    `layout` says how the [k, n] operand is stored: "nt" a transposed [n, k] weight (nn.Linear), "nn" a
    row-major [k, n] matrix (oneDNN then reads a transposed view)."""

    def __init__(self, cache_dir: str | None = None, budget_s: float = 10.0, measure: bool = True):
        from fusion.costmodel import tuning

        self.cache_dir = cache_dir
        self.budget = tuning.Budget(budget_s) if measure else None

    @staticmethod
    def key(m: int, k: int, n: int, bias: bool, layout: str) -> str:
        return f"fp32 {m}x{k}x{n} bias={int(bias)} {layout}"

    def times(self, m: int, k: int, n: int, bias: bool, layout: str, hw: Any = None) -> dict[str, float] | None:
        """{"aten": s, "onednn": s} of one [m, k] x [k, n] product (+ bias), or None (not measured, no budget)."""
        from fusion.costmodel import tuning

        pm, pn = _proxy(m, k, n)
        rate = (getattr(hw, "gemm_flops", None) or {}).get("float32") or 1e11
        cost = 2 * (tuning.ROUNDS + 1) * (2.0 * pm * k * pn / rate + 2e-5)
        return tuning.fastest("linear", self.key(m, k, n, bias, layout),
                              lambda: _linear_candidates(pm, k, pn, bias, layout), self.cache_dir, self.budget, cost,
                              scale=(m * n) / (pm * pn))

    def choice(self, m: int, k: int, n: int, bias: bool, layout: str, hw: Any = None) -> str | None:
        """"onednn" or "aten" by measurement; None when there is no measurement."""
        t = self.times(m, k, n, bias, layout, hw)
        if not t or "aten" not in t or "onednn" not in t:
            return None
        return "onednn" if t["onednn"] < MEASURED_GAIN * t["aten"] else "aten"


def _proxy(m: int, k: int, n: int) -> tuple[int, int]:
    """(m, n) of the product actually timed: the real ones, or, where the operands would exceed
    tuning.MAX_MEASURE_BYTES, fewer rows and columns (same K; halved, the larger first, down to 64)."""
    from fusion.costmodel import tuning

    while 4 * (m * k + k * n + m * n) > tuning.MAX_MEASURE_BYTES and (m > 64 or n > 64):
        if n >= m and n > 64:
            n = max(64, n // 2)
        else:
            m = max(64, m // 2)
    return m, n


def _linear_candidates(m: int, k: int, n: int, bias: bool, layout: str) -> dict[str, Any]:
    """Both ways to run the product on fresh operands (never a weight: shapes only)."""
    a = torch.randn(m, k)
    w = torch.randn(n, k) if layout == "nt" else torch.randn(k, n)
    wt = w.t()                              # the [k, n] operand ATen sees / the [n, k] one oneDNN reads
    b = torch.randn(n) if bias else None
    out = torch.empty(m, n)
    linear = onednn_linear()
    if layout == "nt":
        aten_fn = (lambda: torch.addmm(b, a, wt, out=out)) if bias else (lambda: torch.mm(a, wt, out=out))
        return {"aten": aten_fn, "onednn": lambda: linear(a, w, b, "none", [], "")}
    aten_fn = (lambda: torch.addmm(b, a, w, out=out)) if bias else (lambda: torch.mm(a, w, out=out))
    return {"aten": aten_fn, "onednn": lambda: linear(a, wt, b, "none", [], "")}


def _moves_to_onednn(m: Any, k: int, n: Any, bias: bool, layout: str, hw: Any, tuner: GemmTuner | None) -> bool:
    """Measured faster on oneDNN at this shape; unmeasured, the profile's rates decide (prefers_onednn and
    _worth_it). Symbolic sizes by their hint."""
    from fusion.dialect.values import hint

    if onednn_linear() is None:
        return False
    measured = tuner.choice(hint(m), k, hint(n), bias, layout, hw) if tuner is not None else None
    if measured is not None:
        return measured == "onednn"
    return prefers_onednn(hw) and _worth_it(m, k, n, hw)


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


def product_seconds(m: int, k: int, n: int, bias: bool, hw: Any, tuner: GemmTuner | None = None) -> tuple[float, str]:
    """Seconds of one fp32 CPU product [m, k] x [k, n] (+ a bias row) as the program will run it after this
    pass: measured at this shape when `tuner` has (or may take) a measurement, the faster library's time;
    else predicted: (time, "onednn") when `use_onednn_gemms` would move it by the profile (oneDNN's rate +
    EXTRA_CALL_S), or (time, "aten") on ATen's MKL path (the roofline model, calls included)."""
    from fusion.costmodel.roofline import op_cost

    times = tuner.times(m, k, n, bias, "nt", hw) if tuner is not None and onednn_linear() is not None else None
    if times and "aten" in times and "onednn" in times:
        lib = "onednn" if times["onednn"] < MEASURED_GAIN * times["aten"] else "aten"
        return times[lib], lib

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


def lower_stacked_linears(gm: fx.GraphModule, hw: Any, tuner: GemmTuner | None = None) -> tuple[fx.GraphModule, int]:
    """`fusion.stacked_linear(x, ws, bs)` -> `fusion.dialect.stacked.stacked_linear_impl(x, ws, bs, onednn)`: the same
    function called directly (a custom op's dispatch costs ~7 us a call here), on oneDNN when its merged
    product measured faster there (as for any other GEMM). (gm, how many)."""
    from fusion.dialect.stacked import stacked_linear_impl

    op = torch.ops.fusion.stacked_linear.default
    if not any(n.op == "call_function" and n.target is op for n in gm.graph.nodes):
        return gm, 0
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    count = 0
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target is not op:
            continue
        x, ws, bs = n.args
        xv, ov = _val(x), _val(n)
        onednn = bool(_cpu_fp32_2d(x) and isinstance(ov, torch.Tensor) and isinstance(xv.shape[1], int)
                      and xv.shape[1] > 0
                      and _moves_to_onednn(xv.shape[0], xv.shape[1], ov.shape[1], any(b is not None for b in bs),
                                           "nt", hw, tuner))
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


def _layout(b: fx.Node) -> str:
    """"nt" when the [k, n] operand is the transpose of a row-major [n, k] tensor (a linear's weight), else "nn"."""
    if b.target in (aten.permute.default, aten.t.default) and isinstance(b.args[0], fx.Node):
        dims = b.args[1] if b.target is aten.permute.default else [1, 0]
        src = _val(b.args[0])
        if list(dims) == [1, 0] and _cpu_fp32_2d(b.args[0]) and src.is_contiguous():
            return "nt"
    return "nn"


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


def use_onednn_gemms(gm: fx.GraphModule, hw: Any, tuner: GemmTuner | None = None) -> tuple[fx.GraphModule, int]:
    """Rewrite each fp32 CPU mm/addmm to oneDNN's linear where it measured faster at that product's shape
    (`tuner`; unmeasured: where the profile says so); (gm, count)."""
    linear = onednn_linear()
    if linear is None or (tuner is None and not prefers_onednn(hw)):
        return gm, 0
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
        if not _moves_to_onednn(_val(a).shape[0], k, _val(n).shape[1], bias is not None, _layout(b), hw, tuner):
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
