"""Linear: a matrix product plus a bias row is `addmm` (one GEMM with the bias in its epilogue)."""
from __future__ import annotations

from collections.abc import Iterable

from egglog import RewriteOrRule, Vec, eq, i64, rewrite, ruleset

from rewrites.egraph import Tensor, addmm, mm, shape


@ruleset
def linear_rules(x: Tensor, w: Tensor, b: Tensor, t: Vec[i64]) -> Iterable[RewriteOrRule]:
    yield rewrite(b + mm(x, w)).to(
        addmm(b, x, w), eq(shape(w)).to(t), eq(shape(b)).to(Vec[i64](t[1])))          # b + x@w = addmm(b, x, w)
