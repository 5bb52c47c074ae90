"""Roofline cost of one e-node of the rewrite e-graph (see `rewrites/egraph.py` for the ops).

An e-node is one kernel/ATen call: it reads its tensor inputs once and writes its output once;
a fused op therefore costs one read of x (and weight/bias) and one write, against the sum of the
reads, writes and calls of its decomposed form. Leaves (`var`, `scalar`, `none`) cost nothing.

Sizes come from the e-graph's `shape` table; a symbolic size (negative id) counts as
`SYMBOLIC_SIZE`; a class without a shape takes the largest size among its inputs.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from costmodel.hardware import HardwareProfile
from costmodel.roofline import Cost

SYMBOLIC_SIZE = 64
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


def numel(shape: Sequence[int] | None) -> float | None:
    if shape is None:
        return None
    return float(math.prod(SYMBOLIC_SIZE if s < 0 else s for s in shape))


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
        k = (SYMBOLIC_SIZE if a[-1] < 0 else a[-1]) if a else 1
        c.gemm_flops = 2 * n_out * k
        if op == "addmm":
            c.flops = n_out
    elif op in ("softmax", "log_softmax"):
        c.flops, c.transcendentals = 4 * n_out, n_out
    elif op == "layer_norm":
        c.flops = 8 * n_out
        c.transcendentals = n_out / max(1, (out_shape[-1] if out_shape and out_shape[-1] > 0 else 1))
    elif op == "rms_norm":
        c.flops = 4 * n_out
        c.transcendentals = n_out / max(1, (out_shape[-1] if out_shape and out_shape[-1] > 0 else 1))
    elif op == "gelu":
        c.flops, c.transcendentals = 8 * n_out, n_out
    elif op == "attention":   # reads q, k, v, mask; writes [.., S, Dv]; scores [.., S, L] stay in cache
        q, k = children[0], children[1]
        if q and k:
            dim = lambda v: SYMBOLIC_SIZE if v < 0 else v
            scores = numel(q) / max(1, dim(q[-1])) * dim(k[-2])
            c.gemm_flops = 2 * scores * dim(q[-1]) + 2 * scores * (dim(out_shape[-1]) if out_shape else dim(q[-1]))
            c.flops, c.transcendentals = 4 * scores, scores
    elif op == "silu":
        c.flops, c.transcendentals = 2 * n_out, n_out
    else:
        c.flops = n_out
    return c


def enode_seconds(cost: Cost, hw: HardwareProfile | None) -> float:
    return cost.time(hw or DEFAULT_PROFILE) if cost.calls else 0.0


CostFn = Callable[[int], float]
