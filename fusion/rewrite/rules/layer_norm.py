"""Layer norm over the last dim, with or without weight and bias.

Variance forms meet in `variance(x, d, 0, keepdim)`: E[x^2] - E[x]^2 and E[(x - E x)^2] are
rewritten to it; `/sqrt(v + eps)` reaches `* rsqrt(v + eps)` through the algebra family.
`fusion.layer_norm` normalises over the last dim only, so the core rule is conditioned on
`d == rank(x) - 1`; weight and bias must be 1-D of the normalised size and of x's dtype.
Weights are leaves, and leaves are inserted as the first operand: `w * ln(x) + b`.
"""
from __future__ import annotations

from collections.abc import Iterable

from egglog import RewriteOrRule, String, Vec, eq, f64, i64, rewrite, ruleset

from fusion.rewrite.egraph import NONE, TRUE, Tensor, c, dtype, layer_norm, mean, rsqrt, shape, variance


@ruleset
def layer_norm_rules(
    x: Tensor, w: Tensor, b: Tensor, d: i64, eps: f64, s: Vec[i64], a: String,
) -> Iterable[RewriteOrRule]:
    last_dim = (eq(shape(x)).to(s), eq(d).to(s.length() - 1))
    def vector_of_last_dim(v: Tensor):  # v is [N] for x of shape [..., N], same dtype
        return (eq(shape(x)).to(s), eq(shape(v)).to(Vec[i64](s[s.length() - 1])),
                eq(dtype(x)).to(a), eq(dtype(v)).to(a))

    yield rewrite(mean(x ** f64(2.0), d, TRUE) - mean(x, d, TRUE) ** f64(2.0)).to(variance(x, d, 0.0, TRUE))  # E[x^2]-E[x]^2 = Var x
    yield rewrite(mean((x - mean(x, d, TRUE)) ** f64(2.0), d, TRUE)).to(variance(x, d, 0.0, TRUE))      # E[(x-Ex)^2] = Var x
    yield rewrite((x - mean(x, d, TRUE)) * rsqrt(variance(x, d, 0.0, TRUE) + c(eps))).to(
        layer_norm(x, NONE, NONE, eps), *last_dim)                                                 # (x-Ex)/sqrt(Var x+eps) = ln(x)
    yield rewrite(w * layer_norm(x, NONE, NONE, eps)).to(
        layer_norm(x, w, NONE, eps), *vector_of_last_dim(w))                                       # w*ln(x) = ln(x; w)
    yield rewrite(b + layer_norm(x, w, NONE, eps)).to(
        layer_norm(x, w, b, eps), *vector_of_last_dim(b))                                          # ln(x; w)+b = ln(x; w, b)
