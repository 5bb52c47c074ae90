"""Roofline cost of one e-node of the rewrite e-graph (see `fusion/rewrite/egraph.py` for the ops).

Two views of an e-node, both used by extraction (`fusion/extract/ilp.py`):

- **alone** (`enode_cost`): the e-node is one kernel/ATen call: it reads its tensor inputs once and
  writes its output once; a fused op therefore costs one read of x (and weight/bias) and one write,
  against the sum of the reads, writes and calls of its decomposed form.
- **inside a generated kernel** (`enode_role` == "fusible", `inside_cost`): only its arithmetic
  (FLOPs, transcendentals at the generated code's rates) and the passes it makes over a row already
  in cache; what crosses the kernel boundary is charged per e-class by extraction (`boundary_costs`),
  as the scheduler (`fusion/lower/schedule.py`) would draw the boundaries.

Leaves (`var`, `scalar`, `none`) cost nothing.

Sizes come from the e-graph's `shape` table; a symbolic size (`values.is_symbolic_id`) counts as
`fusion.dialect.values.UNKNOWN_SIZE` (the size the scheduler and the roofline take for it too); a class
without a shape takes the largest size among its inputs.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from fusion.costmodel.hardware import ATTENTION_KEY, BMM_KEY, HardwareProfile
from fusion.costmodel.roofline import Cost
from fusion.dialect.values import UNKNOWN_SIZE, is_symbolic_id

ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
TRANSCENDENTAL = {"exp", "log", "erf", "tanh", "sigmoid", "sqrt", "rsqrt"}
LEAVES = {"var", "scalar", "none"}
#: views: no data moves (a copy, `clone`, is costed as one)
VIEWS = {"view", "expand", "permute", "unsqueeze"}
#: logical e-nodes (rewrites/egraph.LOGICAL) exist for rules to match through; extraction never picks them
LOGICAL = {"reshape_", "transpose_", "matmul", "repeat_kv"}
LOGICAL_COST = Cost(calls=10**6)

#: the default profile (used when no HardwareProfile is given): a modest 2-core CPU
DEFAULT_PROFILE = HardwareProfile(
    name="default", copy_bandwidth=40e9, cache_bandwidth=40e9, llc_bytes=32 * 2**20,
    gemm_flops={"float32": 150e9, "bfloat16": 150e9, "float16": 150e9, "float64": 75e9},
    vector_flops=100e9, transcendental_rate=2e9, kernel_overhead=5e-6, aten_overhead=5e-6,
    page_fault_bandwidth=0.0,
)


def _dim(d: int) -> int:
    """A dim of the shape table: a symbolic one (`values.is_symbolic_id`) counts UNKNOWN_SIZE."""
    return UNKNOWN_SIZE if is_symbolic_id(d) else d


def numel(shape: Sequence[int] | None) -> float | None:
    if shape is None:
        return None
    return float(math.prod(_dim(s) for s in shape))


def _last(shape: Sequence[int] | None) -> int:
    """The last dim (a symbolic one counts UNKNOWN_SIZE), at least 1."""
    if not shape:
        return 1
    return max(1, _dim(shape[-1]))


def enode_cost(
    op: str, literals: Sequence[object], children: Sequence[Sequence[int] | None],
    out_shape: Sequence[int] | None, dtype: str | None,
) -> Cost:
    """Cost of one call of `op`. `children` are the shapes of its tensor inputs (None: unknown or
    a scalar/absent operand), `literals` its non-tensor arguments in order."""
    if op in LEAVES:
        return Cost()
    if op in VIEWS:
        return Cost(calls=1e-3)        # a view: metadata only (a tiny cost so no-op views are not added)
    if op in LOGICAL:
        return LOGICAL_COST
    item = ITEMSIZE.get(dtype or "float32", 4)
    ins = [numel(s) for s in children]
    known = [n for n in ins if n is not None]
    n_out = numel(out_shape)
    if n_out is None:
        n_out = max(known, default=float(2**16))
    read = sum(known) * item
    write = n_out * item
    n_in = max(known, default=n_out)
    c = Cost(bytes_read=read, bytes_written=write, calls=1, gemm_dtype=dtype or "float32")
    if op in ("add", "sub", "mul", "div"):
        c.flops = n_out
    elif op == "pow_":
        c.flops = 2 * n_out
    elif op == "unary":
        c.flops = n_out
        if literals and literals[0] in TRANSCENDENTAL:
            c.transcendentals = n_out
    elif op == "reduce":
        c.flops = n_in
    elif op == "var_":
        c.flops = 3 * n_in
    elif op in ("mm", "bmm", "addmm"):
        a = children[-2]
        k = _dim(a[-1]) if a else 1
        c.gemm_flops = 2 * n_out * k
        if op == "addmm":
            c.flops = n_out
        if op == "bmm" and c.gemm_dtype == "float32":
            c.gemm_dtype = BMM_KEY          # batched head-shaped products: their own measured rate
    elif op in ("softmax", "log_softmax"):
        c.flops, c.transcendentals = 4 * n_out, n_out
    # fused ops: the FLOPs of their canonical decomposition, so that a fused op and the same math fused
    # by the scheduler tie on arithmetic (the extraction hedge then prefers the fused op)
    elif op == "layer_norm":     # mean 1, x-mean 1, square 1, mean 1, *rstd 1, *w 1, +b 1
        c.flops = 7 * n_out
        c.transcendentals = n_out / _last(out_shape)          # one rsqrt per row
    elif op == "rms_norm":
        c.flops = 4 * n_out
        c.transcendentals = n_out / _last(out_shape)
    elif op == "gelu":           # erf: x/sqrt2, +1, *x, *0.5; tanh: x^3 (2), *c, +x, *k, +1, *x, *0.5; quick: *1.702, +1, /
        approx = literals[0] if literals else "none"
        c.flops, c.transcendentals = {"tanh": 8, "quick": 3}.get(approx, 4) * n_out, n_out
    elif op == "attention":   # reads q, k, v, mask; writes [.., S, Dv]; scores [.., S, L] stay in cache
        q, k = children[0], children[1]
        if q and k:
            scores = numel(q) / max(1, _dim(q[-1])) * _dim(k[-2])
            c.gemm_flops = 2 * scores * _dim(q[-1]) + 2 * scores * (_dim(out_shape[-1]) if out_shape else _dim(q[-1]))
            # as roofline._sdpa_cost (the FX-level price of the same call)
            c.flops, c.transcendentals, c.transcendental_mix = 6 * scores, scores, {"exp": scores}
            if c.gemm_dtype == "float32":
                c.gemm_dtype = ATTENTION_KEY
    elif op == "silu":
        c.flops, c.transcendentals = 2 * n_out, n_out
    elif op == "glu":            # act(g) (as silu / gelu above) and the product
        act = literals[0] if literals else "silu"
        c.flops, c.transcendentals = {"silu": 3, "gelu": 5, "gelu_tanh": 9}.get(act, 3) * n_out, n_out
    else:
        c.flops = n_out
    return c


def enode_seconds(cost: Cost, hw: HardwareProfile | None) -> float:
    return cost.time(hw or DEFAULT_PROFILE) if cost.calls else 0.0


# --- inside a generated kernel -----------------------------------------------------------------------
#: e-graph ops the scheduler puts in a row kernel (fusion/lower/schedule.py POINTWISE / ROW_FUSED / REDUCTIONS)
POINTWISE_OPS = {"add", "sub", "mul", "div", "pow_", "unary", "where", "gelu", "silu", "glu"}
#: row-wise fused ops -> passes over the row before the final (writing) pass, e.g. softmax: max, sum
ROW_OPS = {"softmax": 2, "log_softmax": 2, "layer_norm": 2, "rms_norm": 1}
#: one-dim reductions (fusible only over the last dim): literals (name, dim, keepdim) / (dim, correction, keepdim)
REDUCTION_OPS = {"reduce": 1, "var_": 0}
#: dtypes generated CPU kernels compute in (the scheduler's FLOAT_IN); Triton adds half types
FUSIBLE_DTYPES_CPU = frozenset({"float32"})
FUSIBLE_DTYPES_GPU = frozenset({"float32", "float16", "bfloat16"})
#: the plain function a generated kernel calls for an op's transcendentals (glibc's expf/erff/tanhf)
TRANSCENDENTAL_FN = {"exp": "exp", "sigmoid": "exp", "silu": "exp", "softmax": "exp", "log_softmax": "exp",
                     "erf": "erf", "tanh": "tanh"}


def enode_role(op: str, literals: Sequence[object], children: Sequence[Sequence[int] | None],
               out_shape: Sequence[int] | None, dtype: str | None,
               fusible_dtypes: frozenset = FUSIBLE_DTYPES_CPU) -> str:
    """How an e-node takes part in kernels: "leaf" (an input or weight, in memory), "scalar" (a Python
    number or an absent operand: no memory), "view" (metadata over a materialised tensor), "fusible"
    (can share a generated row kernel with its fusible producers and consumers) or "opaque" (its own
    ATen/BLAS call: reads materialised inputs, writes a materialised output)."""
    if op == "var":
        return "leaf"
    if op in ("scalar", "none"):
        return "scalar"
    if op in VIEWS:
        return "view"
    if (dtype or "float32") not in fusible_dtypes or out_shape is None:
        return "opaque"
    if op in POINTWISE_OPS:
        return "fusible"
    rank = len(children[0]) if children and children[0] is not None else None
    if op in ROW_OPS:
        if op in ("softmax", "log_softmax"):
            return "fusible" if rank and literals and literals[0] in (-1, rank - 1) else "opaque"
        return "fusible"
    if op in REDUCTION_OPS:
        dim = literals[REDUCTION_OPS[op]] if len(literals) > REDUCTION_OPS[op] else None
        return "fusible" if rank and dim in (-1, rank - 1) else "opaque"
    return "opaque"


def inside_cost(op: str, literals: Sequence[object], children: Sequence[Sequence[int] | None],
                out_shape: Sequence[int] | None, dtype: str | None, hw: HardwareProfile | None) -> float:
    """Seconds of a fusible e-node's work inside a generated kernel: its FLOPs and transcendentals at the
    generated code's rates, plus each extra pass over its (in-cache) input row: a reduction re-reads
    the row it reduces, a fused softmax/norm makes ROW_OPS[op] passes before its final one. Nothing
    for the bytes that cross the kernel boundary (charged per e-class by extraction)."""
    hw = hw or DEFAULT_PROFILE
    c = enode_cost(op, literals, children, out_shape, dtype)
    fn = TRANSCENDENTAL_FN.get(op if op != "unary" else str(literals[0] if literals else ""))
    if op == "gelu":
        fn = {"tanh": "tanh", "quick": "exp"}.get(str(literals[0]) if literals else "none", "erf")
    if op == "glu":
        fn = {"silu": "exp", "gelu": "erf", "gelu_tanh": "tanh"}.get(str(literals[0]) if literals else "silu")
    work = Cost(flops=c.flops, transcendentals=c.transcendentals, generated=True,
                transcendental_mix={fn: c.transcendentals} if fn and c.transcendentals else {})
    passes = ROW_OPS.get(op, 1 if op in REDUCTION_OPS else 0)
    row_bytes = (numel(children[0]) or 0.0) * ITEMSIZE.get(dtype or "float32", 4) if children and children[0] else 0.0
    rates = getattr(hw, "kernel_rates", None) or {}
    cache_bw = rates.get("cache_bandwidth") or hw.cache_bandwidth or hw.copy_bandwidth
    return work.time(hw) + passes * row_bytes / cache_bw


def boundary_seconds(shape: Sequence[int] | None, dtype: str | None, hw: HardwareProfile | None,
                     write: bool) -> float:
    """Seconds for a generated kernel to read (or write, plus the kernel's call) one e-class's value."""
    hw = hw or DEFAULT_PROFILE
    n = numel(shape)
    if n is None:
        n = float(2**16)
    nbytes = n * ITEMSIZE.get(dtype or "float32", 4)
    c = Cost(bytes_read=0.0 if write else nbytes, bytes_written=nbytes if write else 0.0,
             calls=1 if write else 0, generated=True)
    return c.time(hw)


def row_compatible(consumer: str, consumer_shape: Sequence[int] | None, child_shape: Sequence[int] | None) -> bool:
    """Can a fusible consumer read this child's value inside the same row kernel (no materialisation)?
    As the scheduler: the child has the consumer's shape ("full"), or is row-constant relative to it
    with keepdim ([..., 1]), or the consumer reduces the child's last dim (its output is row-constant)."""
    if consumer_shape is None or child_shape is None:
        return False
    a, b = list(consumer_shape), list(child_shape)
    if a == b:
        return True
    if a and b == a[:-1] + [1]:
        return True
    if consumer in REDUCTION_OPS and b and (a == b[:-1] + [1] or a == b[:-1]):
        return True
    return False


CostFn = Callable[[int], float]
