"""Softmax and log-softmax over one dim.

The unstable forms are the definitions; the max-shift is a separate identity, so the stable form
(`exp(x - max x) / sum(...)`) is derived, not listed. Multiplication by the reciprocal of the sum
reaches the same pattern through the algebra family (x*(1/y) -> x/y).
"""
from __future__ import annotations

from collections.abc import Iterable

from egglog import RewriteOrRule, i64, rewrite, ruleset

from fusion.rewrite.egraph import TRUE, Tensor, amax, exp, log, log_softmax, softmax, sum_


@ruleset
def softmax_rules(x: Tensor, d: i64) -> Iterable[RewriteOrRule]:
    yield rewrite(exp(x) / sum_(exp(x), d, TRUE)).to(softmax(x, d))                  # e^x / sum e^x = softmax(x)
    yield rewrite(softmax(x - amax(x, d, TRUE), d)).to(softmax(x, d))                # softmax(x - max x) = softmax(x)
    yield rewrite(x - log(sum_(exp(x), d, TRUE))).to(log_softmax(x, d))              # x - log sum e^x = log_softmax(x)
    yield rewrite(log_softmax(x - amax(x, d, TRUE), d)).to(log_softmax(x, d))        # log_softmax(x - max x) = log_softmax(x)
