"""Linear: a matrix product plus a bias row is `addmm` (one GEMM with the bias in its epilogue)."""
from __future__ import annotations

from collections.abc import Iterable

from egglog import RewriteOrRule, Vec, eq, i64, rewrite, ruleset

from rewrites.egraph import Tensor, addmm, mm, shape, view


@ruleset
def linear_rules(x: Tensor, w: Tensor, b: Tensor, t: Vec[i64], s: Vec[i64]) -> Iterable[RewriteOrRule]:
    bias_row = (eq(shape(w)).to(t), eq(shape(b)).to(Vec[i64](t[1])))
    yield rewrite(b + mm(x, w)).to(addmm(b, x, w), *bias_row)                          # b + x@w = addmm(b, x, w)
    yield rewrite(b + view(mm(x, w), s)).to(view(addmm(b, x, w), s), *bias_row)        # b + view(x@w) = view(addmm(b, x, w))  (3-D matmul)
