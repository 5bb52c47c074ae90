"""Linear: a matrix product plus a bias row is `addmm` (one GEMM with the bias in its epilogue); a
scalar factor on either operand of a matrix product moves to its result.

    b + x @ w = addmm(b, x, w)                 (b a row of w's width)
    x @ (w c) = (x @ w) c,   addmm(b, x, w c) = b + (x @ w) c,   permute(w c, p) = permute(w, p) c
    x @ (-w) = -(x @ w),     addmm(b, x, -w) = b - x @ w,        permute(-w, p) = -permute(w, p)

These are constant folding over weights without a copy (seed 000): `F.linear(x, w * c)` is
`x @ permute(w * c)`, which makes a scaled copy of the whole weight on every call; `(x @ w^T) c` reads
w in place and scales the product instead, and the scale joins the product's epilogue kernel. Which
side gets the scale is the cost model's choice (a product of many rows may be larger than the
weight). The scalar factor is a Python scalar (`c`); a tensor factor is left alone. Only the right
operand (where a linear layer's weight is): a factor on the left operand is an activation's, which
its producer's kernel applies for free, and moving it as well (through the 3-D views) made the
3,000-op extraction 2.7x slower for no gain.
"""
from __future__ import annotations

from collections.abc import Iterable

from egglog import RewriteOrRule, Vec, eq, f64, i64, rewrite, ruleset

from fusion.rewrite.egraph import Tensor, addmm, c, mm, neg, permute, shape, view


@ruleset
def linear_rules(x: Tensor, w: Tensor, b: Tensor, t: Vec[i64], s: Vec[i64]) -> Iterable[RewriteOrRule]:
    bias_row = (eq(shape(w)).to(t), eq(shape(b)).to(Vec[i64](t[1])))
    yield rewrite(b + mm(x, w)).to(addmm(b, x, w), *bias_row)                          # b + x@w = addmm(b, x, w)
    yield rewrite(b + view(mm(x, w), s)).to(view(addmm(b, x, w), s), *bias_row)        # b + view(x@w) = view(addmm(b, x, w))  (3-D matmul)


@ruleset
def scale_rules(x: Tensor, w: Tensor, b: Tensor, p: Vec[i64], k: f64) -> Iterable[RewriteOrRule]:
    yield rewrite(mm(x, w * c(k))).to(mm(x, w) * c(k))                                 # x @ (w c) = (x @ w) c
    yield rewrite(mm(x, neg(w))).to(neg(mm(x, w)))                                     # x @ (-w) = -(x @ w)
    yield rewrite(addmm(b, x, w * c(k))).to(b + mm(x, w) * c(k))                       # addmm(b, x, w c) = b + (x @ w) c
    yield rewrite(addmm(b, x, neg(w))).to(b - mm(x, w))                                # addmm(b, x, -w) = b - x @ w
    yield rewrite(permute(w * c(k), p)).to(permute(w, p) * c(k))                       # permute(w c) = permute(w) c
    yield rewrite(permute(neg(w), p)).to(neg(permute(w, p)))                           # permute(-w) = -permute(w)


linear_family = linear_rules | scale_rules
