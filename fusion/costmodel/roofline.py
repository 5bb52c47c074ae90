"""Roofline cost: time = max(bytes / bandwidth, FLOPs / peak, transcendentals / rate) + call overhead.

Units: bytes, FLOPs (one multiply-add = 2 FLOPs), transcendental evaluations, seconds.

    op_cost(target, in_metas, out_meta, args=(), kwargs=None) -> Cost   one op from shapes/dtypes
    node_cost(node) -> Cost          one FX node as its own ATen call (views: all zero)
    kernel_cost(nodes) -> Cost       the nodes fused into ONE kernel: only bytes crossing its boundary
    graph_cost(gm) -> Cost           the unfused graph: the sum of node_cost
    graph_time(gm, hw) -> float      the unfused graph's predicted seconds (sum of per-node times)

A "meta" is anything with .shape and .dtype (a FakeTensor, a real tensor, TensorMetadata); stride is
used when present to count the distinct elements of a broadcast (expanded, stride-0) operand once.
Symbolic sizes use their hint (fusion.dialect.values.hint: one answer for every stage); a missing or odd meta costs 0 (never raises).
The per-op formulas are in the tables at the end of this file.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field, fields

import torch

from fusion.dialect.values import UNKNOWN_SIZE as DEFAULT_SYMBOLIC_SIZE  # noqa: F401
from fusion.dialect.values import hint as to_int

from fusion.dialect.graph_walk import reaches
from fusion.costmodel.hardware import ATTENTION_KEY, BMM_KEY, HardwareProfile
from fusion.costmodel.ops_table import _CONCAT, _CONV, _CREATE, _EMPTY, _GATHER, _GELU_TANH, _GEMM, _PW, _RED, _SCATTER, _SDPA, BASE_FN, TRANSCENDENTAL_FN, gemm_rate, is_view_target, op_name

MMAP_THRESHOLD = 32 << 20     # bytes; glibc mmaps allocations this big afresh on every call
PARALLEL_GRAIN = 32768        # elements; ATen's at::parallel_for (and generated kernels) stay serial below


@dataclass
class Cost:
    bytes_read: float = 0.0
    bytes_written: float = 0.0
    flops: float = 0.0              # arithmetic FLOPs outside GEMMs (pointwise, reductions)
    gemm_flops: float = 0.0         # FLOPs done by matrix multiplies (and attention's two GEMMs)
    transcendentals: float = 0.0    # exp / tanh / erf / log / sigmoid / sin / cos / pow evaluations
    calls: int = 0                  # kernel launches / ATen calls (all of them)
    gemm_dtype: str = "float32"
    aten_calls: int = 0             # how many of `calls` are ATen calls (charged hw.aten_overhead)
    fresh_bytes: float = 0.0        # bytes written into outputs >= MMAP_THRESHOLD (page-faulted)
    # --- added later; keyword-only in practice (positional construction above stays valid) ---
    transcendental_mix: dict = field(default_factory=dict)  # "exp"/"erf"/"tanh" -> evaluations of it
    parallel_regions: float = 0.0   # OpenMP parallel regions entered (charged hw.parallel_overhead)
    view_calls: float = 0.0         # view ops called from Python (charged hw.view_overhead)
    gemm_calls: float = 0.0         # independent GEMM problems in gemm_flops (bmm batch, heads); 0 = calls
    generated: bool = False         # a generated (C++) kernel: hw.kernel_rates instead of ATen's rates

    @property
    def bytes(self) -> float:
        return self.bytes_read + self.bytes_written

    @property
    def total_flops(self) -> float:
        return self.flops + self.gemm_flops

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOPs per byte moved."""
        return self.total_flops / self.bytes if self.bytes else float("inf")

    def __add__(self, other: "Cost") -> "Cost":
        out = Cost()
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "gemm_dtype":
                v = a if self.gemm_flops or not other.gemm_flops else b
            elif f.name == "transcendental_mix":
                v = {k: a.get(k, 0.0) + b.get(k, 0.0) for k in {*a, *b}}
            elif f.name == "generated":
                v = a or b
            else:
                v = a + b
            setattr(out, f.name, v)
        return out

    def scaled(self, k: float) -> "Cost":
        def sc(name, v):
            if name in ("gemm_dtype", "generated"):
                return v
            if name == "transcendental_mix":
                return {f: n * k for f, n in v.items()}
            return v * k
        return Cost(*(sc(f.name, getattr(self, f.name)) for f in fields(self)))

    def bandwidth(self, hw: HardwareProfile) -> float:
        """hw.cache_bandwidth when all bytes moved fit in half the last-level cache, else hw.copy_bandwidth;
        for a generated kernel the streaming bandwidths its compiled code reaches (hw.kernel_rates)."""
        kr = self._kernel_rates(hw)
        dram = kr.get("dram_bandwidth") or hw.copy_bandwidth
        cache = kr.get("cache_bandwidth") or hw.cache_bandwidth
        if cache and self.bytes <= hw.llc_bytes / 2:
            return max(dram, cache)
        return dram

    def gemm_time(self, hw: HardwareProfile) -> float:
        """GEMM FLOPs at the rate this GEMM size reaches: hw.gemm_curve (measured FLOP/s vs FLOPs per
        GEMM, small sizes) interpolated log-log, the large-GEMM peak hw.gemm_flops beyond it."""
        if not self.gemm_flops:
            return 0.0
        key = self.gemm_dtype
        # bmm / attention rates are measured per call at head shapes (calibrate._attention_curves); a
        # profile without them prices each independent problem at the fp32 GEMM rate
        per_call = key in (BMM_KEY, ATTENTION_KEY)
        if per_call and key not in hw.gemm_flops:
            key, per_call = "float32", False
        peak = hw.gemm_flops.get(key) or hw.gemm_flops.get("float32") or 1e12
        curves = getattr(hw, "gemm_curve", None) or {}
        curve = curves.get(key)
        if curve is None and key == "float32_onednn" and curves.get("float32"):
            # oneDNN's small-size curve is not measured: MKL's fp32 curve scaled by the ratio of the peaks
            k = peak / (hw.gemm_flops.get("float32") or peak)
            curve = [[f, r * k] for f, r in curves["float32"]]
        n = (self.calls or 1) if per_call else (self.gemm_calls or self.calls or 1)
        return self.gemm_flops / gemm_rate(curve, self.gemm_flops / n, peak)

    def _kernel_rates(self, hw: HardwareProfile) -> dict:
        return (getattr(hw, "kernel_rates", None) or {}) if self.generated else {}

    def vector_time(self, hw: HardwareProfile) -> float:
        """Non-GEMM FLOPs: ATen pointwise throughput (hw.vector_flops), or for a generated kernel the
        register-level rate its compiled code reaches (hw.kernel_rates["flops"]) when measured."""
        return self.flops / (self._kernel_rates(hw).get("flops") or hw.vector_flops)

    def transcendental_time(self, hw: HardwareProfile) -> float:
        """Evaluations of a known function at its own measured rate, the rest at the harmonic-mean rate
        hw.transcendental_rate. ATen ops: hw.transcendental_rates (per op for gelu/silu/softmax, else per
        function, ops_table.BASE_FN); generated kernels: hw.kernel_rates (glibc's vector functions)."""
        if not self.transcendentals:
            return 0.0
        kr = self._kernel_rates(hw)
        rates = kr or getattr(hw, "transcendental_rates", None) or {}
        t, known = 0.0, 0.0
        for fn, n in self.transcendental_mix.items():
            r = (None if kr else rates.get(fn)) or rates.get(BASE_FN.get(fn, fn))
            if r:
                t += n / r
                known += n
        return t + max(self.transcendentals - known, 0.0) / hw.transcendental_rate

    def time(self, hw: HardwareProfile, overhead: float | None = None) -> float:
        """Predicted seconds on `hw`: the roofline max of the three limits, plus per-call overheads.

        max(bytes / bandwidth, GEMM time + FLOPs / vector_flops + transcendental time)
        (generated kernels: + (1 - overlap) * min of the two, hw.kernel_rates["overlap"] measured)
        + fresh_bytes / hw.page_fault_bandwidth (first touch of freshly mmapped outputs)
        + calls: `overhead` each when given; else ATen calls pay hw.aten_overhead, the others
          hw.kernel_overhead (+ hw.launch_overhead on GPUs)
        + parallel_regions * hw.parallel_overhead (OpenMP fork/join) + view_calls * hw.view_overhead."""
        t_mem = self.bytes / self.bandwidth(hw)
        t_cmp = self.gemm_time(hw) + self.vector_time(hw) + self.transcendental_time(hw)
        pf = getattr(hw, "page_fault_bandwidth", 0.0)
        t_fault = self.fresh_bytes / pf if pf else 0.0
        if overhead is not None:
            t_calls = self.calls * overhead
        else:
            launch = getattr(hw, "launch_overhead", 0.0)
            kernels = max(self.calls - self.aten_calls, 0)
            t_calls = kernels * (hw.kernel_overhead + launch) + self.aten_calls * hw.aten_overhead
        t_calls += (self.parallel_regions * getattr(hw, "parallel_overhead", 0.0)
                    + self.view_calls * getattr(hw, "view_overhead", 0.0))
        # generated kernels: only the measured fraction `overlap` of the smaller term hides under the larger
        ov = self._kernel_rates(hw).get("overlap", 1.0)
        return max(t_mem, t_cmp) + (1.0 - ov) * min(t_mem, t_cmp) + t_fault + t_calls

    def breakdown(self, hw: HardwareProfile) -> dict:
        """Each roofline term in seconds and which one bounds the kernel ("memory"/"compute")."""
        t_mem = self.bytes / hw.copy_bandwidth
        t_cmp = (self.gemm_flops / (hw.gemm_flops.get(self.gemm_dtype) or hw.gemm_flops["float32"])
                 + self.flops / hw.vector_flops + self.transcendentals / hw.transcendental_rate)
        return {"memory_s": t_mem, "compute_s": t_cmp, "total_s": self.time(hw),
                "bound": "memory" if t_mem >= t_cmp else "compute"}


# ----------------------------------------------------------------------------------------------
# metas: shapes, sizes, bytes (symbolic-safe)
# ----------------------------------------------------------------------------------------------
def is_tensor_meta(m) -> bool:
    return hasattr(m, "shape") and hasattr(m, "dtype") and isinstance(getattr(m, "dtype"), torch.dtype)


def shape_of(m) -> tuple[int, ...]:
    try:
        return tuple(to_int(d) for d in m.shape)
    except Exception:
        return ()


def numel(m) -> int:
    n = 1
    for d in shape_of(m):
        n *= d
    return n


def itemsize(m) -> int:
    try:
        return m.dtype.itemsize
    except Exception:
        return 4


def nbytes(m) -> float:
    """Bytes of a tensor as written (dense): numel * itemsize."""
    return float(numel(m) * itemsize(m)) if is_tensor_meta(m) else 0.0


def distinct_bytes(m) -> float:
    """Bytes a kernel must read for operand m: its own elements, each once. A broadcast (stride-0)
    dim does not multiply the count, so an expanded [1,1,S,S] mask costs S*S elements."""
    if not is_tensor_meta(m):
        return 0.0
    shape = shape_of(m)
    stride = None
    try:
        stride = tuple(to_int(s, 1) for s in m.stride())
    except Exception:
        try:
            stride = tuple(to_int(s, 1) for s in m.stride)
        except Exception:
            stride = None
    n = 1
    for i, d in enumerate(shape):
        if stride is not None and i < len(stride) and stride[i] == 0:
            continue
        n *= d
    return float(n * itemsize(m))


def flat_metas(x) -> list:
    """All tensor metas in a (nested) value: a meta, a tuple/list of them, None, ints..."""
    if is_tensor_meta(x):
        return [x]
    if isinstance(x, (list, tuple)):
        return [m for v in x for m in flat_metas(v)]
    return []


def node_val(n):
    if not isinstance(n, torch.fx.Node):
        return n
    v = n.meta.get("val")
    if v is None:
        v = n.meta.get("tensor_meta")
    return v


def _map_args(a):
    if isinstance(a, torch.fx.Node):
        return node_val(a)
    if isinstance(a, (list, tuple)):
        return type(a)(_map_args(x) for x in a) if not hasattr(a, "_fields") else a
    if isinstance(a, dict):
        return {k: _map_args(v) for k, v in a.items()}
    return a


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def op_cost(target, in_metas, out_meta, args=(), kwargs=None) -> Cost:
    """Cost of one op as its own ATen call. in_metas: the tensor inputs in argument order (metas);
    out_meta: its output meta (or tuple of metas); args/kwargs: the op's arguments with tensors
    replaced by their metas (for dims, `approximate`, biases...). Never raises: an unknown op costs
    read-inputs + write-outputs + 1 FLOP per output element."""
    try:
        return _op_cost_impl(target, list(in_metas or []), out_meta, tuple(args or ()), dict(kwargs or {}))
    except Exception:
        outs = flat_metas(out_meta)
        return Cost(bytes_read=sum(distinct_bytes(m) for m in in_metas or [] if is_tensor_meta(m)),
                    bytes_written=sum(nbytes(m) for m in outs),
                    flops=float(sum(numel(m) for m in outs)), calls=1, aten_calls=1)


def is_view_node(n: torch.fx.Node) -> bool:
    return n.op == "call_function" and is_view_target(n.target)


def node_cost(node: torch.fx.Node) -> Cost:
    """One FX node as an ATen call. placeholder/get_attr/output and views cost nothing."""
    if node.op != "call_function" or node.target is operator.getitem or is_view_node(node):
        return Cost()
    seen: set[int] = set()
    in_metas = []
    for a in _flat_nodes((node.args, node.kwargs)):
        if id(a) in seen:
            continue                                    # x * x reads x once
        seen.add(id(a))
        in_metas.extend(flat_metas(node_val(a)))
    return op_cost(node.target, in_metas, node_val(node), _map_args(node.args), _map_args(node.kwargs))


def _flat_nodes(a) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    torch.fx.node.map_arg(a, lambda n: out.append(n) or n)
    return out


def _view_root(n: torch.fx.Node) -> torch.fx.Node:
    """Follow view ops (and getitem of view ops such as split) back to the node that owns the data."""
    seen = 0
    while n.op == "call_function" and seen < 1000:
        seen += 1
        if is_view_node(n) and n.args and isinstance(n.args[0], torch.fx.Node):
            n = n.args[0]
        elif (n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node)
              and is_view_node(n.args[0])):
            n = n.args[0]
        else:
            break
    return n


def _escapes(n: torch.fx.Node, inside: set) -> bool:
    """Is n's value used outside the kernel (by a non-view node not in it, or the graph output)?"""
    def view(u: torch.fx.Node) -> bool:               # views are free, look through them
        return u not in inside and (is_view_node(u) or u.target is operator.getitem)

    return reaches(n, lambda u: u.op == "output" or (u not in inside and not view(u)), view)


def kernel_cost(nodes) -> Cost:
    """Cost of fusing `nodes` into ONE kernel: bytes crossing the kernel boundary only (each value
    produced outside read once, each value used outside or returned written once), FLOPs and
    transcendentals summed over the nodes, 1 call (0 if the nodes are only views)."""
    nodes = list(nodes)
    compute = [n for n in nodes if n.op == "call_function" and not is_view_node(n)
               and n.target is not operator.getitem]
    inside = set(compute)
    total = Cost()
    reads: dict[torch.fx.Node, list] = {}              # outside root -> metas of the views we read
    for n in compute:
        c = node_cost(n)
        total.flops += c.flops
        total.gemm_flops += c.gemm_flops
        total.transcendentals += c.transcendentals
        if c.gemm_flops and not total.gemm_flops - c.gemm_flops:
            total.gemm_dtype = c.gemm_dtype
        for a in _flat_nodes((n.args, n.kwargs)):
            root = _view_root(a)
            if root in inside:
                continue
            lst = reads.setdefault(root, [])
            if not any(x is a for x, _ in lst):
                lst.append((a, node_val(a)))
    for root, views in reads.items():
        own = sum(distinct_bytes(m) for _, v in views for m in flat_metas(v))
        base = sum(distinct_bytes(m) for m in flat_metas(node_val(root)))
        total.bytes_read += min(own, base) if base else own
    for n in compute:
        v = node_val(n)
        if isinstance(v, (tuple, list)):
            for u in n.users:
                if u.target is operator.getitem and isinstance(u.args[1], int) and u.args[1] < len(v):
                    if _escapes(u, inside):
                        b = sum(nbytes(m) for m in flat_metas(v[u.args[1]]))
                        total.bytes_written += b
                        total.fresh_bytes += b if b >= MMAP_THRESHOLD else 0.0
                elif u.op == "output" or (u not in inside and u.target is not operator.getitem):
                    total.bytes_written += sum(nbytes(m) for m in flat_metas(v))
                    break
        elif _escapes(n, inside):
            b = nbytes(v)
            total.bytes_written += b
            total.fresh_bytes += b if b >= MMAP_THRESHOLD else 0.0
    total.calls = 1 if compute else 0
    total.generated = bool(compute)
    mix: dict[str, float] = {}
    for n in compute:                       # the kernel's code calls the plain functions (expf, erff...)
        for fn, cnt in node_cost(n).transcendental_mix.items():
            mix[BASE_FN.get(fn, fn)] = mix.get(BASE_FN.get(fn, fn), 0.0) + cnt
    total.transcendental_mix = mix
    work = max((numel(m) for n in compute for m in flat_metas(node_val(n))), default=0)
    total.parallel_regions = 1.0 if work >= PARALLEL_GRAIN else 0.0
    return total


def graph_cost(gm) -> Cost:
    """The unfused graph: the sum of node costs (each non-view node one ATen call)."""
    graph = gm.graph if hasattr(gm, "graph") else gm
    total = Cost()
    for n in graph.nodes:
        total = total + node_cost(n)
    return total


def graph_time(gm, hw: HardwareProfile) -> float:
    """Predicted seconds of the unfused graph: per-node roofline times summed (each node is its own
    kernel, so the max is taken per node, not over the summed cost)."""
    graph = gm.graph if hasattr(gm, "graph") else gm
    return sum(node_cost(n).time(hw) for n in graph.nodes if n.op == "call_function")


# ----------------------------------------------------------------------------------------------
# per-op formulas (the tables: fusion/costmodel/ops_table.py)
# ----------------------------------------------------------------------------------------------

def _dtype_name(m) -> str:
    return str(getattr(m, "dtype", "torch.float32")).replace("torch.", "")


def _arg(args, kwargs, i, name, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def _gemm_cost(name, ins, outs, args, kwargs) -> Cost:
    out_n = sum(numel(m) for m in outs[:1])
    c = Cost()
    if name in ("addmm", "baddbmm", "addbmm", "addmv"):
        a, bias_extra = (ins[1] if len(ins) > 1 else ins[0]), True
    elif name in ("linear", "_linear_pointwise"):     # (x, weight[N, K], bias or None, ...)
        a, bias_extra = ins[0], len(ins) > 2
    elif name in ("stacked_linear", "stacked_linear_impl"):   # (x, [w1, w2, ...], [b1, b2, ...]): one GEMM
        a, bias_extra = ins[0], any(len(shape_of(m)) == 1 for m in ins[1:])
    else:
        a, bias_extra = ins[0], False
    sh = shape_of(a)
    k = sh[-1] if sh else 1
    if name == "addbmm":                    # sum over the batch: out [M,N], K per batch, B batches
        k *= sh[0] if len(sh) == 3 else 1
    c.gemm_flops = 2.0 * out_n * k          # 2*M*N*K FLOPs (multiply + add per MAC)
    if bias_extra:
        c.flops = float(out_n)              # + M*N for the bias add (addmm, baddbmm, linear with bias)
    c.gemm_dtype = "int8" if name in ("_int_mm", "_weight_int8pack_mm") else _dtype_name(a)
    if name == "_scaled_mm":
        c.gemm_dtype = _dtype_name(a)
    if (name == "_linear_pointwise" or name == "stacked_linear_impl" and len(args) > 3 and args[3] is True) \
            and c.gemm_dtype == "float32":
        c.gemm_dtype = "float32_onednn"     # oneDNN's rate (calibrate: gemm_flops["float32_onednn"])
    osh = shape_of(outs[0]) if outs else ()
    if name in ("bmm", "baddbmm") and len(osh) == 3:
        c.gemm_calls = float(osh[0])        # B independent [M, K] x [K, N] problems
        if c.gemm_dtype == "float32":
            c.gemm_dtype = BMM_KEY          # measured per call at head shapes where calibrated
    else:
        c.gemm_calls = 1.0                  # mm/addmm/linear (a 3-D linear input is one flattened GEMM)
    return c


def _conv_cost(name, ins, outs, args, kwargs) -> Cost:
    x, w = ins[0], ins[1] if len(ins) > 1 else ins[0]
    ws = shape_of(w)
    kprod = 1
    for d in ws[2:]:
        kprod *= d
    transposed = bool(_arg(args, kwargs, 6, "transposed", False)) if name in ("convolution", "_convolution") \
        else name.startswith("conv_transpose")
    if transposed:                          # weight [Cin, Cout/g, k...]: each input elt * Cout/g * k
        flops = 2.0 * numel(x) * (ws[1] if len(ws) > 1 else 1) * kprod
    else:                                   # weight [Cout, Cin/g, k...]: each output elt * Cin/g * k
        flops = 2.0 * sum(numel(m) for m in outs[:1]) * (ws[1] if len(ws) > 1 else 1) * kprod
    bias = len(ins) > 2
    return Cost(gemm_flops=flops, flops=float(sum(numel(m) for m in outs[:1])) if bias else 0.0,
                gemm_dtype=_dtype_name(x))


def _sdpa_cost(name, ins, outs, args, kwargs) -> Cost:
    q, k, v = (ins + [ins[-1]] * 3)[:3]
    qs, ks, vs = shape_of(q), shape_of(k), shape_of(v)
    L, D = (qs[-2], qs[-1]) if len(qs) >= 2 else (1, 1)
    S = ks[-2] if len(ks) >= 2 else 1
    Dv = vs[-1] if vs else D
    bh = numel(q) // max(L * D, 1)          # batch * heads
    scores = float(bh * L * S)
    if name == "attention":                 # fusion.attention(q, k, v, mask, scale, causal)
        mask = _arg(args, kwargs, 3, "mask", None)
        # with an explicit mask the causal case runs SDPA on mask & tril: no block is skipped
        causal = bool(_arg(args, kwargs, 5, "causal", False)) and mask is None
    elif name == "_scaled_dot_product_attention_math":
        causal = bool(kwargs.get("is_causal", False))
    else:
        causal = bool(_arg(args, kwargs, 5 if name == "scaled_dot_product_attention" else 4, "is_causal", False))
    frac = 0.5 if causal else 1.0           # flash kernels skip the masked half
    c = Cost()
    c.gemm_flops = 2.0 * scores * (D + Dv) * frac      # QK^T: 2*BH*L*S*D; PV: 2*BH*L*S*Dv -> 4BHLSD
    c.flops = 6.0 * scores * frac           # scale, mask add, softmax (max, sub, sum, mul)
    c.transcendentals = scores * frac       # one exp per score
    c.transcendental_mix = {"exp": c.transcendentals}
    c.gemm_dtype = _dtype_name(q)
    c.gemm_calls = 2.0 * bh                 # per (batch, head): Q K^T and P V, blocked small GEMMs
    if c.gemm_dtype == "float32":           # the whole call's measured rate where calibrated
        c.gemm_dtype = ATTENTION_KEY
    return c


def _op_cost_impl(target, ins, out_meta, args, kwargs) -> Cost:
    ns, name = op_name(target)
    outs = flat_metas(out_meta)
    ins = [m for m in ins if is_tensor_meta(m)]
    if is_view_target(target):
        return Cost()                       # views: 0 bytes, 0 FLOPs, 0 calls
    if not outs and not ns:
        return Cost()                       # python arithmetic on SymInts, asserts ...
    base = name[:-1] if name.endswith("_") and name[:-1] in _PW else name
    out_elems = float(sum(numel(m) for m in outs))
    written = sum(nbytes(m) for m in outs)
    read = sum(distinct_bytes(m) for m in ins)   # each operand's own elements once (broadcast: once)
    fresh = sum(nbytes(m) for m in outs if nbytes(m) >= MMAP_THRESHOLD)
    c = Cost(bytes_read=read, bytes_written=written, calls=1, aten_calls=1, fresh_bytes=fresh)
    first = shape_of(ins[0]) if ins else ()
    if ns == "fusion" and name == "layer_norm" or name in ("native_layer_norm", "layer_norm"):
        # one read of x (+ weight, bias), one write. Per element: mean (1 add), x-mean (1),
        # square+accumulate (2), *rstd (1), *weight (1), +bias (1) = 7 FLOPs; per row 1 rsqrt.
        rows = numel(ins[0]) / max(first[-1] if first else 1, 1) if ins else 0
        c.flops = 7.0 * numel(ins[0]) + 2.0 * rows if ins else 0.0
    elif ns == "fusion" and name == "rms_norm" or name == "rms_norm":
        # per element: x*x + accumulate (2), *rstd (1), *weight (1) = 4 FLOPs; per row mean + rsqrt.
        rows = numel(ins[0]) / max(first[-1] if first else 1, 1) if ins else 0
        c.flops = 4.0 * numel(ins[0]) + 2.0 * rows if ins else 0.0
    elif name in ("_softmax", "softmax", "_safe_softmax", "special_softmax"):
        # per element: max (1), x-max (1), exp (1 transcendental), sum (1), * 1/sum (1) = 4 FLOPs + 1 exp
        c.flops, c.transcendentals = 4.0 * out_elems, out_elems
    elif name in ("_log_softmax", "log_softmax", "special_log_softmax"):
        # per element: max (1), x-max (1), exp (1 tr), sum (1), - log(sum) (1) = 4 FLOPs + 1 exp;
        # per row one log.
        dim = _arg(args, kwargs, 1, "dim", -1)
        size = first[dim] if first and isinstance(dim, int) and -len(first) <= dim < len(first) else 1
        c.flops, c.transcendentals = 4.0 * out_elems, out_elems + out_elems / max(size, 1)
    elif name in ("_softmax_backward_data", "_log_softmax_backward_data"):
        c.flops = 4.0 * out_elems           # g*y, row sum, g - s, * y
        c.transcendentals = out_elems if name.startswith("_log") else 0.0
    elif name == "native_layer_norm_backward" or name == "native_group_norm_backward":
        c.flops = 12.0 * (numel(ins[0]) if ins else 0)
    elif name in ("native_group_norm", "group_norm", "_native_batch_norm_legit_no_training",
                  "_native_batch_norm_legit", "native_batch_norm", "batch_norm"):
        c.flops = 7.0 * (numel(ins[0]) if ins else 0)
    elif name in _GEMM:
        g = _gemm_cost(name, ins, outs, args, kwargs)
        c.gemm_flops, c.flops, c.gemm_dtype, c.gemm_calls = g.gemm_flops, g.flops, g.gemm_dtype, g.gemm_calls
    elif name in _CONV:
        g = _conv_cost(name, ins, outs, args, kwargs)
        c.gemm_flops, c.flops, c.gemm_dtype = g.gemm_flops, g.flops, g.gemm_dtype
    elif name in _SDPA:
        g = _sdpa_cost(name, ins, outs, args, kwargs)
        c.gemm_flops, c.flops, c.transcendentals, c.gemm_dtype = g.gemm_flops, g.flops, g.transcendentals, g.gemm_dtype
        c.transcendental_mix, c.gemm_calls = g.transcendental_mix, g.gemm_calls
    elif name == "gelu" and _arg(args, kwargs, 1, "approximate", "none") == "tanh":
        c.flops, c.transcendentals = _GELU_TANH[0] * out_elems, _GELU_TANH[1] * out_elems
    elif name in ("pow", "float_power"):
        e = args[1] if len(args) > 1 and isinstance(args[1], (int, float)) else kwargs.get("exponent")
        if isinstance(e, (int, float)) and e in (0, 1, 2, 3, 0.5, -0.5, -1, -2):
            c.flops = (2.0 if e in (3, -2) else 1.0) * out_elems   # x*x, sqrt, rsqrt, 1/x
        else:
            c.flops, c.transcendentals = out_elems, 2.0 * out_elems    # exp(e * log(x))
    elif base in _PW:
        f, t = _PW[base]
        if name in ("add", "sub") and _arg(args, kwargs, 2, "alpha", 1) not in (1, None):
            f += 1
        c.flops, c.transcendentals = f * out_elems, t * out_elems
    elif name in _RED:
        f, t = _RED[name]
        n_in = float(numel(ins[0])) if ins else out_elems
        c.flops, c.transcendentals = f * n_in, t * n_in
    elif name in _CREATE:
        c.bytes_read = 0.0
        c.flops = 4.0 * out_elems if name.startswith("rand") else 0.0
    elif name in _EMPTY:
        c.bytes_read = c.bytes_written = c.fresh_bytes = 0.0
    elif name in _GATHER:
        # the gathered rows (output-sized, in the source dtype) + the index tensors
        src = ins[0] if ins else None       # embedding(weight, indices), index_select(self, ...)
        idx = [m for m in ins if m is not src]
        c.bytes_read = out_elems * (itemsize(src) if src is not None else 4) + sum(distinct_bytes(m) for m in idx)
    elif name in _SCATTER or name in _CONCAT:
        pass                                # read every input once, write the output: the default
    elif name in ("native_dropout", "dropout"):
        train = _arg(args, kwargs, 2, "train", False)
        c.flops = (3.0 if train else 0.0) * numel(ins[0]) if ins else 0.0
    elif name in ("sort", "topk", "argsort", "msort", "kthvalue", "median"):
        n_in = float(numel(ins[0])) if ins else 0.0
        size = first[-1] if first else 1
        c.flops = n_in * max(size, 2).bit_length()   # ~ n log2 n comparisons
    else:
        c.flops = out_elems                 # unknown op: read inputs, write outputs, 1 FLOP/element
    if c.transcendentals and not c.transcendental_mix:
        fn = TRANSCENDENTAL_FN.get(base)
        if name == "gelu" and _arg(args, kwargs, 1, "approximate", "none") == "tanh":
            fn = "tanh"
        if fn:
            c.transcendental_mix = {fn: c.transcendentals}
    # ATen splits an op over the threads (one OpenMP parallel region) above its grain size
    work = max(out_elems, max((numel(m) for m in ins), default=0))
    if (work > PARALLEL_GRAIN or c.gemm_flops) and name not in _EMPTY:
        c.parallel_regions = 1.0
    return c

