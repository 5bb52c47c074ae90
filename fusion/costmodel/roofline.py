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
`Cost` and its time: fusion/costmodel/cost.py; sizes and bytes of metas: fusion/costmodel/metas.py. The per-op
formulas are at the end of this file, one function per op family (`_FORMULAS_EARLY`, `_FORMULAS_LATE`), over
the tables of fusion/costmodel/ops_table.py.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from fusion.dialect.values import UNKNOWN_SIZE as DEFAULT_SYMBOLIC_SIZE  # noqa: F401
from fusion.dialect.values import hint as to_int  # noqa: F401  (re-exported: passes.gemm)

from fusion.dialect.graph_walk import reaches
from fusion.costmodel.cost import Cost
from fusion.costmodel.hardware import ATTENTION_KEY, BMM_KEY, HardwareProfile
from fusion.costmodel.metas import distinct_bytes, flat_metas, is_tensor_meta, itemsize, map_args, nbytes, node_val, numel, shape_of
from fusion.costmodel.ops_table import _CONCAT, _CONV, _CREATE, _EMPTY, _GATHER, _GELU_TANH, _GEMM, _PW, _RED, _SCATTER, _SDPA, BASE_FN, TRANSCENDENTAL_FN, is_view_target, op_name
from fusion.costmodel.ops_table import gemm_rate  # noqa: F401  (re-exported)

MMAP_THRESHOLD = 32 << 20     # bytes; glibc mmaps allocations this big afresh on every call
PARALLEL_GRAIN = 32768        # elements; ATen's at::parallel_for (and generated kernels) stay serial below


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
    return op_cost(node.target, in_metas, node_val(node), map_args(node.args), map_args(node.kwargs))


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
    if name == "decomposed_attention":      # fusion/passes/attention.py: every score computed, causal or not
        causal = False
    elif name == "attention":               # fusion.attention(q, k, v, mask, scale, causal)
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


@dataclass
class _Op:
    """One op call as the per-op formulas read it: its name (and `base`, an in-place pointwise op's name
    without the trailing _), tensor inputs and outputs (metas), arguments, output elements, first input's shape."""
    name: str
    base: str
    ins: list
    outs: list
    args: tuple
    kwargs: dict
    out_elems: float
    first: tuple

    def arg(self, i, name, default=None):
        return _arg(self.args, self.kwargs, i, name, default)

    @property
    def gelu_tanh(self) -> bool:
        return self.name == "gelu" and self.arg(1, "approximate", "none") == "tanh"


def _op_cost_impl(target, ins, out_meta, args, kwargs) -> Cost:
    ns, name = op_name(target)
    outs = flat_metas(out_meta)
    ins = [m for m in ins if is_tensor_meta(m)]
    if is_view_target(target):
        return Cost()                       # views: 0 bytes, 0 FLOPs, 0 calls
    if not outs and not ns:
        return Cost()                       # python arithmetic on SymInts, asserts ...
    base = name[:-1] if name.endswith("_") and name[:-1] in _PW else name
    op = _Op(name, base, ins, outs, args, kwargs, float(sum(numel(m) for m in outs)),
             shape_of(ins[0]) if ins else ())
    written = sum(nbytes(m) for m in outs)
    read = sum(distinct_bytes(m) for m in ins)   # each operand's own elements once (broadcast: once)
    fresh = sum(nbytes(m) for m in outs if nbytes(m) >= MMAP_THRESHOLD)
    c = Cost(bytes_read=read, bytes_written=written, calls=1, aten_calls=1, fresh_bytes=fresh)
    _formula(op)(op, c)
    if c.transcendentals and not c.transcendental_mix:
        fn = "tanh" if op.gelu_tanh else TRANSCENDENTAL_FN.get(base)
        if fn:
            c.transcendental_mix = {fn: c.transcendentals}
    # ATen splits an op over the threads (one OpenMP parallel region) above its grain size
    work = max(op.out_elems, max((numel(m) for m in ins), default=0))
    if (work > PARALLEL_GRAIN or c.gemm_flops) and name not in _EMPTY:
        c.parallel_regions = 1.0
    return c


def _formula(op: _Op):
    """The formula of op's family: the first family naming it in `_FORMULAS` (before the pointwise ones),
    else tanh-GELU, else pointwise (by `base`), else the later families, else the unknown-op default."""
    f = _EARLY.get(op.name)
    if f is not None:
        return f
    if op.gelu_tanh:
        return _gelu_tanh
    if op.base in _PW:
        return _pointwise
    return _LATE.get(op.name, _unknown)


# Each formula fills the FLOPs / transcendentals (and, where they differ from "read every input once,
# write every output", the bytes) of Cost `c` for the op call `op`.

def _rows(op: _Op) -> float:
    return numel(op.ins[0]) / max(op.first[-1] if op.first else 1, 1) if op.ins else 0


def _layer_norm(op: _Op, c: Cost) -> None:
    # one read of x (+ weight, bias), one write. Per element: mean (1 add), x-mean (1),
    # square+accumulate (2), *rstd (1), *weight (1), +bias (1) = 7 FLOPs; per row 1 rsqrt.
    c.flops = 7.0 * numel(op.ins[0]) + 2.0 * _rows(op) if op.ins else 0.0


def _rms_norm(op: _Op, c: Cost) -> None:
    # per element: x*x + accumulate (2), *rstd (1), *weight (1) = 4 FLOPs; per row mean + rsqrt.
    c.flops = 4.0 * numel(op.ins[0]) + 2.0 * _rows(op) if op.ins else 0.0


def _softmax(op: _Op, c: Cost) -> None:
    # per element: max (1), x-max (1), exp (1 transcendental), sum (1), * 1/sum (1) = 4 FLOPs + 1 exp
    c.flops, c.transcendentals = 4.0 * op.out_elems, op.out_elems


def _log_softmax(op: _Op, c: Cost) -> None:
    # per element: max (1), x-max (1), exp (1 tr), sum (1), - log(sum) (1) = 4 FLOPs + 1 exp;
    # per row one log.
    dim, first = op.arg(1, "dim", -1), op.first
    size = first[dim] if first and isinstance(dim, int) and -len(first) <= dim < len(first) else 1
    c.flops, c.transcendentals = 4.0 * op.out_elems, op.out_elems + op.out_elems / max(size, 1)


def _softmax_backward(op: _Op, c: Cost) -> None:
    c.flops = 4.0 * op.out_elems            # g*y, row sum, g - s, * y
    c.transcendentals = op.out_elems if op.name.startswith("_log") else 0.0


def _norm_backward(op: _Op, c: Cost) -> None:
    c.flops = 12.0 * (numel(op.ins[0]) if op.ins else 0)


def _norm(op: _Op, c: Cost) -> None:
    c.flops = 7.0 * (numel(op.ins[0]) if op.ins else 0)


def _gemm(op: _Op, c: Cost) -> None:
    g = _gemm_cost(op.name, op.ins, op.outs, op.args, op.kwargs)
    c.gemm_flops, c.flops, c.gemm_dtype, c.gemm_calls = g.gemm_flops, g.flops, g.gemm_dtype, g.gemm_calls


def _conv(op: _Op, c: Cost) -> None:
    g = _conv_cost(op.name, op.ins, op.outs, op.args, op.kwargs)
    c.gemm_flops, c.flops, c.gemm_dtype = g.gemm_flops, g.flops, g.gemm_dtype


def _sdpa(op: _Op, c: Cost) -> None:
    g = _sdpa_cost(op.name, op.ins, op.outs, op.args, op.kwargs)
    c.gemm_flops, c.flops, c.transcendentals, c.gemm_dtype = g.gemm_flops, g.flops, g.transcendentals, g.gemm_dtype
    c.transcendental_mix, c.gemm_calls = g.transcendental_mix, g.gemm_calls


def _pow(op: _Op, c: Cost) -> None:
    args = op.args
    e = args[1] if len(args) > 1 and isinstance(args[1], (int, float)) else op.kwargs.get("exponent")
    if isinstance(e, (int, float)) and e in (0, 1, 2, 3, 0.5, -0.5, -1, -2):
        c.flops = (2.0 if e in (3, -2) else 1.0) * op.out_elems   # x*x, sqrt, rsqrt, 1/x
    else:
        c.flops, c.transcendentals = op.out_elems, 2.0 * op.out_elems    # exp(e * log(x))


def _gelu_tanh(op: _Op, c: Cost) -> None:
    c.flops, c.transcendentals = _GELU_TANH[0] * op.out_elems, _GELU_TANH[1] * op.out_elems


def _pointwise(op: _Op, c: Cost) -> None:
    f, t = _PW[op.base]
    if op.name in ("add", "sub") and op.arg(2, "alpha", 1) not in (1, None):
        f += 1
    c.flops, c.transcendentals = f * op.out_elems, t * op.out_elems


def _reduction(op: _Op, c: Cost) -> None:
    f, t = _RED[op.name]
    n_in = float(numel(op.ins[0])) if op.ins else op.out_elems
    c.flops, c.transcendentals = f * n_in, t * n_in


def _create(op: _Op, c: Cost) -> None:
    c.bytes_read = 0.0
    c.flops = 4.0 * op.out_elems if op.name.startswith("rand") else 0.0


def _empty(op: _Op, c: Cost) -> None:
    c.bytes_read = c.bytes_written = c.fresh_bytes = 0.0


def _gather(op: _Op, c: Cost) -> None:
    # the gathered rows (output-sized, in the source dtype) + the index tensors
    src = op.ins[0] if op.ins else None     # embedding(weight, indices), index_select(self, ...)
    idx = [m for m in op.ins if m is not src]
    c.bytes_read = op.out_elems * (itemsize(src) if src is not None else 4) + sum(distinct_bytes(m) for m in idx)


def _copy_in_out(op: _Op, c: Cost) -> None:
    pass                                    # read every input once, write the output: the default


def _dropout(op: _Op, c: Cost) -> None:
    train = op.arg(2, "train", False)
    c.flops = (3.0 if train else 0.0) * numel(op.ins[0]) if op.ins else 0.0


def _sort(op: _Op, c: Cost) -> None:
    n_in = float(numel(op.ins[0])) if op.ins else 0.0
    size = op.first[-1] if op.first else 1
    c.flops = n_in * max(size, 2).bit_length()   # ~ n log2 n comparisons


def _unknown(op: _Op, c: Cost) -> None:
    c.flops = op.out_elems                  # unknown op: read inputs, write outputs, 1 FLOP/element


#: (op names, formula) in the order they are tried: the families before the pointwise ops, then (after
#: tanh-GELU and the pointwise table `_PW`, see `_formula`) the later ones; the first family naming an op wins.
_FORMULAS_EARLY = [
    (("native_layer_norm", "layer_norm"), _layer_norm),          # (fusion.layer_norm too)
    (("rms_norm",), _rms_norm),                                   # (fusion.rms_norm too)
    (("_softmax", "softmax", "_safe_softmax", "special_softmax"), _softmax),
    (("_log_softmax", "log_softmax", "special_log_softmax"), _log_softmax),
    (("_softmax_backward_data", "_log_softmax_backward_data"), _softmax_backward),
    (("native_layer_norm_backward", "native_group_norm_backward"), _norm_backward),
    (("native_group_norm", "group_norm", "_native_batch_norm_legit_no_training",
      "_native_batch_norm_legit", "native_batch_norm", "batch_norm"), _norm),
    (_GEMM, _gemm),
    (_CONV, _conv),
    (_SDPA, _sdpa),
    (("pow", "float_power"), _pow),     # (after tanh-GELU in the order; no name is both)
]
_FORMULAS_LATE = [
    (_RED, _reduction),
    (_CREATE, _create),
    (_EMPTY, _empty),
    (_GATHER, _gather),
    ((*_SCATTER, *_CONCAT), _copy_in_out),
    (("native_dropout", "dropout"), _dropout),
    (("sort", "topk", "argsort", "msort", "kthvalue", "median"), _sort),
]


def _first_wins(families) -> dict:
    table: dict = {}
    for names, formula in families:
        for n in names:
            table.setdefault(n, formula)
    return table


_EARLY = _first_wins(_FORMULAS_EARLY)
_LATE = _first_wins(_FORMULAS_LATE)
