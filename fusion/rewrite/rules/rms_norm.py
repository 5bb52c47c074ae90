"""RMSNorm (LLaMA style) over the last dim: x * rsqrt(mean(x^2, -1, keepdim) + eps) * w.

`x*x` reaches `x ** 2` and `x / sqrt(...)` reaches `x * rsqrt(...)` through the algebra family; the
weight is a leaf, so it is inserted as the first operand whichever order the source used.
"""
from __future__ import annotations

from collections.abc import Iterable

from egglog import RewriteOrRule, String, Vec, eq, f64, i64, rewrite, ruleset

from fusion.rewrite.egraph import NONE, TRUE, Tensor, c, dtype, mean, rms_norm, rsqrt, shape


@ruleset
def rms_norm_rules(x: Tensor, w: Tensor, d: i64, eps: f64, s: Vec[i64], a: String) -> Iterable[RewriteOrRule]:
    yield rewrite(x * rsqrt(mean(x ** f64(2.0), d, TRUE) + c(eps))).to(
        rms_norm(x, NONE, eps), eq(shape(x)).to(s), eq(d).to(s.length() - 1))         # x/sqrt(E[x^2]+eps) = rms(x)
    yield rewrite(w * rms_norm(x, NONE, eps)).to(
        rms_norm(x, w, eps), eq(shape(x)).to(s), eq(shape(w)).to(Vec[i64](s[s.length() - 1])),
        eq(dtype(x)).to(a), eq(dtype(w)).to(a))                                       # w*rms(x) = rms(x; w)
