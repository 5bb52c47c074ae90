"""GELU (erf, tanh and quick forms) and SiLU.

Constants are matched to within 1e-8 of their exact values, so `x / 1.4142135623730951`,
`x * 0.7071067811865476` and `0.7978845608` all match (well inside fp32 rounding), `0.7071` does not.
`x / sqrt(2)` reaches `x * (1/sqrt 2)` and `0.5 * x * (...)` reaches `(x * (...)) * 0.5` through the
algebra family; `x**3` is reached from `x*x*x` the same way, and the factored tanh form of HF's FastGELU
(`x * 0.7978845608 * (1 + 0.044715 * x * x)`) by distributing its `x` (for that coefficient only).
Quick GELU (`x * sigmoid(1.702 x)`, HF `QuickGELUActivation`) is `gelu(x, "quick")` in the e-graph and
`fusion.gelu_quick` in FX; its exp form `x / (1 + e^(-1.702 x))` reaches it through the sigmoid identity
of the silu family and the algebra family's `x * (-k) = -(x * k)`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

from egglog import RewriteOrRule, f64, rewrite, ruleset

from fusion.rewrite.egraph import Tensor, c, erf, exp, gelu, reciprocal, sigmoid, silu, tanh, unary

SQRT1_2 = 1.0 / math.sqrt(2.0)           # 0.7071067811865476
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # 0.7978845608028654
TANH_CUBIC = 0.044715                   # the cubic coefficient of the tanh form
QUICK = 1.702                            # QuickGELU's constant (an approximation by definition: exact match)
TOL = 1e-8


@ruleset
def gelu_rules(x: Tensor, k: f64) -> Iterable[RewriteOrRule]:
    yield rewrite((x * (erf(x * c(k)) + c(1.0))) * c(0.5)).to(
        gelu(x, "none"), abs(k - SQRT1_2) < TOL)                                       # x/2 (1+erf(x/sqrt2)) = gelu(x)
    yield rewrite((x * (tanh((x + (x ** f64(3.0)) * c(0.044715)) * c(k)) + c(1.0))) * c(0.5)).to(
        gelu(x, "tanh"), abs(k - SQRT_2_OVER_PI) < TOL)                                # x/2 (1+tanh(sqrt(2/pi)(x+0.044715x^3)))
    yield rewrite(x * sigmoid(x * c(k))).to(gelu(x, "quick"), abs(k - QUICK) < TOL)   # x sigmoid(1.702x) = gelu_quick(x)
    yield rewrite(x * ((x ** f64(2.0)) * c(k) + c(1.0))).to(
        x + (x ** f64(3.0)) * c(k), abs(k - TANH_CUBIC) < TOL)                          # x (1 + 0.044715 x^2) = x + 0.044715 x^3


@ruleset
def silu_rules(x: Tensor, y: Tensor) -> Iterable[RewriteOrRule]:
    yield rewrite(x * sigmoid(x)).to(silu(x))                                          # x*sigmoid(x) = silu(x)
    yield rewrite(x / (exp(unary("neg", x)) + c(1.0))).to(silu(x))                     # x/(1+e^-x) = silu(x)  (x*(1/(1+e^-x)) via algebra)
    yield rewrite(reciprocal(exp(unary("neg", x)) + c(1.0))).to(sigmoid(x))            # 1/(1+e^-x) = sigmoid(x)
    yield rewrite(x / (exp(unary("neg", y)) + c(1.0))).to(x * sigmoid(y))              # x/(1+e^-y) = x*sigmoid(y)
