"""A small algebra family: normal forms that let the fusion patterns compose.

Each rule is one identity, oriented towards a normal form (there is no associativity or
commutativity rule; operand order of commutative ops is fixed when a graph is inserted):
scalars move outwards and last, division by a constant becomes a multiplication, a power of x is
written `x ** k`, and a normaliser (`rsqrt`, `reciprocal`) is the last factor, applied to the value it
normalises: `(w * x) * rsqrt(v)` is `w * (x * rsqrt(v))`, so a weight written before the division
(`w * (x - mean) / sqrt(var + eps)`) meets the norm rules as a scale of the normalised value.

Scalars float past tensors only (`(x*a)*y` with y of rank >= 1): letting two scalars swap
places as well makes constant folding run forever once `x*1 -> x` has closed a cycle
(`(x*0.5)*2` grew to 170k e-nodes in 12 iterations); scalar pairs are folded instead.
"""
from __future__ import annotations

from collections.abc import Iterable

from egglog import Bool, RewriteOrRule, String, Vec, eq, f64, i64, ne, rewrite, ruleset

from fusion.rewrite.egraph import Tensor, c, neg, reciprocal, reduce, rsqrt, shape, sqrt, unsqueeze, variance, view

#: |k*N - 1| below this: `sum(x)*k` is `mean(x)` (1/N rounded to f64, far inside fp32 rounding)
MEAN_TOL = 1e-12


@ruleset
def scalar_algebra(x: Tensor, y: Tensor, z: Tensor, k: f64, k2: f64, s: Vec[i64]) -> Iterable[RewriteOrRule]:
    def tensor(t: Tensor):  # t has rank >= 1, so it is not a Python scalar
        return eq(shape(t)).to(s), s.length() > i64(0)

    yield rewrite(x / c(k)).to(x * c(1.0 / k), ne(k).to(f64(0.0)))   # x/c -> x*(1/c)
    yield rewrite(x - c(k)).to(x + c(-k))                           # x-c -> x+(-c)
    yield rewrite(x * c(1.0)).to(x)                                 # x*1 -> x
    yield rewrite(x * c(k)).to(neg(x * c(-k)), k < f64(0.0))   # x*(-k) -> -(x*k)  (x*-1 -> -x with x*1 -> x)
    yield rewrite(x + c(0.0)).to(x)                                 # x+0 -> x
    yield rewrite((x * c(k)) * c(k2)).to(x * c(k * k2))             # (x*a)*b -> x*(ab)
    yield rewrite((x * c(k)) * y).to((x * y) * c(k), *tensor(y))     # (x*a)*y -> (x*y)*a  (y not a scalar)
    yield rewrite(x * (y * c(k))).to((x * y) * c(k))                # x*(y*a) -> (x*y)*a
    yield rewrite(x * reciprocal(y)).to(x / y)                      # x*(1/y) -> x/y
    yield rewrite(x / sqrt(y)).to(x * rsqrt(y))                     # x/sqrt(y) -> x*rsqrt(y)
    yield rewrite(rsqrt(y) * x).to(x * rsqrt(y))                    # rsqrt(y)*x -> x*rsqrt(y)
    yield rewrite(reciprocal(y) * x).to(x / y)                      # (1/y)*x -> x/y
    yield rewrite((x * y) * rsqrt(z)).to(x * (y * rsqrt(z)))        # (w*x)*rsqrt(v) -> w*(x*rsqrt(v))  (w scales the normalised x)
    yield rewrite(x * x).to(x ** f64(2.0))                         # x*x -> x^2
    yield rewrite((x ** k) * x).to(x ** (k + f64(1.0)))            # x^k*x -> x^(k+1)
    yield rewrite(x * (x ** k)).to(x ** (k + f64(1.0)))            # x*x^k -> x^(k+1)
    yield rewrite(x ** f64(1.0)).to(x)                              # x^1 -> x
    yield rewrite(x ** f64(0.5)).to(sqrt(x))                        # x^0.5 -> sqrt(x)   (ATen's pow calls sqrt)
    yield rewrite(x ** f64(-0.5)).to(rsqrt(x))                      # x^-0.5 -> rsqrt(x)  (ATen's pow calls rsqrt)
    yield rewrite(neg(neg(x))).to(x)                                # -(-x) -> x
    yield rewrite(x + neg(y)).to(x - y, *tensor(x))                 # x+(-y) -> x-y
    yield rewrite(neg(y) + x).to(x - y, *tensor(x))                 # (-y)+x -> x-y
    yield rewrite(x - neg(y)).to(x + y, *tensor(x))                 # x-(-y) -> x+y


@ruleset
def reductions(x: Tensor, op: String, d: i64, k: f64, e: f64, s: Vec[i64], t: Vec[i64], kd: Bool) -> Iterable[RewriteOrRule]:
    """Reduction normal forms: keepdim=True, and `mean` for sum/N."""
    drop, keep = Bool(False), Bool(True)
    yield rewrite(reduce("sum", x, d, kd) * c(k)).to(
        reduce("mean", x, d, kd), eq(shape(x)).to(s), s[d] > i64(0),
        abs(k * f64.from_i64(s[d]) - f64(1.0)) < f64(MEAN_TOL))                  # sum(x)/N -> mean(x)
    yield rewrite(unsqueeze(reduce(op, x, d, drop), d)).to(reduce(op, x, d, keep))      # unsqueeze(r(x), d) -> r(x, keepdim)
    yield rewrite(unsqueeze(variance(x, d, e, drop), d)).to(variance(x, d, e, keep))    # same for the variance
    yield rewrite(view(reduce(op, x, d, drop), t)).to(
        reduce(op, x, d, keep), eq(shape(x)).to(s), eq(t).to(s.set(d, i64(1))))        # view(r(x), keepdim shape) -> r(x, keepdim)
    yield rewrite(view(variance(x, d, e, drop), t)).to(
        variance(x, d, e, keep), eq(shape(x)).to(s), eq(t).to(s.set(d, i64(1))))     # same for the variance


algebra = scalar_algebra | reductions
