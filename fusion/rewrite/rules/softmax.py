"""Softmax and log-softmax over one dim.

The unstable forms are the definitions; the max-shift is a separate identity, so the stable form
(`exp(x - max x) / sum(...)`) is derived, not listed. Multiplication by the reciprocal of the sum
reaches the same pattern through the algebra family (x*(1/y) -> x/y).

`torch.logsumexp` decomposes to `log(sum(exp(x - w))) + w` with w the row max guarded against infinities
(`where(|max| == inf, 0, max)`). For any w that is one value per row (w's shape is the keepdim reduction's),
`x - w - log sum e^(x - w) = x - log sum e^x`, so `x - logsumexp(x)` is log_softmax whatever w's guard is.
The sum is written `w + log(...)`: w is defined before the log that reads it, and the inserter puts the
earlier operand of a commutative op first. `log(softmax(x))` is log_softmax too; the fused op is finite where softmax underflows to 0.
"""
from __future__ import annotations

from collections.abc import Iterable

from egglog import RewriteOrRule, eq, i64, rewrite, ruleset

from fusion.rewrite.egraph import TRUE, Tensor, amax, exp, log, log_softmax, shape, softmax, sum_


@ruleset
def softmax_rules(x: Tensor, w: Tensor, d: i64) -> Iterable[RewriteOrRule]:
    yield rewrite(exp(x) / sum_(exp(x), d, TRUE)).to(softmax(x, d))                  # e^x / sum e^x = softmax(x)
    yield rewrite(softmax(x - amax(x, d, TRUE), d)).to(softmax(x, d))                # softmax(x - max x) = softmax(x)
    yield rewrite(x - log(sum_(exp(x), d, TRUE))).to(log_softmax(x, d))              # x - log sum e^x = log_softmax(x)
    yield rewrite(log_softmax(x - amax(x, d, TRUE), d)).to(log_softmax(x, d))        # log_softmax(x - max x) = log_softmax(x)
    yield rewrite(log(softmax(x, d))).to(log_softmax(x, d))                            # log(softmax x) = log_softmax(x)
    lse = sum_(exp(x - w), d, TRUE)
    per_row = eq(shape(w)).to(shape(lse))
    yield rewrite(x - (w + log(lse))).to(log_softmax(x, d), per_row)                  # x - logsumexp(x) = log_softmax(x)
