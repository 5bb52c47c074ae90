"""Shape and dtype analysis for terms that rewrites create.

FX nodes arrive with `shape`/`dtype` set from `meta["val"]`; these rules fill them in for new terms.
The functions have no merge, so a rule that computes a different shape for an existing e-class
stops the run with "Illegal merge attempted for function shape" -- a wrong rule is loud, not silent.

Broadcasting is modelled for the two cases rewrites produce: equal shapes and a scalar operand.
A term whose shape no rule can derive (a general broadcast) simply has no shape, and every
shape-conditioned rule declines to fire on it.
"""
from __future__ import annotations

from collections.abc import Iterable

from egglog import Bool, RewriteOrRule, String, Vec, eq, f64, i64, rule, ruleset, set_

from rewrites.egraph import (
    Tensor,
    addmm,
    bmm,
    dtype,
    gelu,
    layer_norm,
    log_softmax,
    mm,
    reduce,
    rms_norm,
    shape,
    silu,
    softmax,
    unary,
    variance,
)

SCALAR_SHAPE = Vec[i64].empty()


def _binary(x: Tensor, y: Tensor) -> list[Tensor]:
    return [x + y, x - y, x * y, x / y]


@ruleset
def shape_rules(
    x: Tensor, y: Tensor, z: Tensor, s: Vec[i64], t: Vec[i64], op: String, d: i64, k: f64, e: f64,
    a: String,
) -> Iterable[RewriteOrRule]:
    yield rule(Tensor.scalar(k)).then(set_(shape(Tensor.scalar(k))).to(SCALAR_SHAPE))  # a Python scalar has rank 0
    for b in _binary(x, y):
        yield rule(b, eq(shape(x)).to(s), eq(shape(y)).to(s)).then(set_(shape(b)).to(s))            # [s] op [s] : [s]
        yield rule(b, eq(shape(x)).to(s), eq(shape(y)).to(SCALAR_SHAPE)).then(set_(shape(b)).to(s))  # [s] op c : [s]
    yield rule(x ** k, eq(shape(x)).to(s)).then(set_(shape(x ** k)).to(s))                          # x^k : shape(x)
    yield rule(unary(op, x), eq(shape(x)).to(s)).then(set_(shape(unary(op, x))).to(s))              # f(x) : shape(x)
    r_keep, r_drop = reduce(op, x, d, Bool(True)), reduce(op, x, d, Bool(False))
    yield rule(r_keep, eq(shape(x)).to(s)).then(set_(shape(r_keep)).to(s.set(d, i64(1))))          # keepdim: size 1
    yield rule(r_drop, eq(shape(x)).to(s)).then(set_(shape(r_drop)).to(s.remove(d)))               # dim removed
    v_keep, v_drop = variance(x, d, e, Bool(True)), variance(x, d, e, Bool(False))
    yield rule(v_keep, eq(shape(x)).to(s)).then(set_(shape(v_keep)).to(s.set(d, i64(1))))
    yield rule(v_drop, eq(shape(x)).to(s)).then(set_(shape(v_drop)).to(s.remove(d)))
    yield rule(mm(x, y), eq(shape(x)).to(s), eq(shape(y)).to(t)).then(
        set_(shape(mm(x, y))).to(Vec[i64](s[0], t[1])))                                             # [m,k]@[k,n] : [m,n]
    yield rule(bmm(x, y), eq(shape(x)).to(s), eq(shape(y)).to(t)).then(
        set_(shape(bmm(x, y))).to(Vec[i64](s[0], s[1], t[2])))                                      # [b,m,k]@[b,k,n] : [b,m,n]
    yield rule(addmm(z, x, y), eq(shape(x)).to(s), eq(shape(y)).to(t)).then(
        set_(shape(addmm(z, x, y))).to(Vec[i64](s[0], t[1])))
    for f in (softmax(x, d), log_softmax(x, d), gelu(x, a), silu(x), layer_norm(x, y, z, e), rms_norm(x, y, e)):
        yield rule(f, eq(shape(x)).to(s)).then(set_(shape(f)).to(s))                               # fused ops keep x's shape


@ruleset
def dtype_rules(x: Tensor, y: Tensor, z: Tensor, op: String, d: i64, k: f64, e: f64, a: String, b: Bool) -> Iterable[RewriteOrRule]:
    for bx in _binary(x, y):
        yield rule(bx, eq(dtype(x)).to(a), eq(dtype(y)).to(a)).then(set_(dtype(bx)).to(a))          # same dtypes
    for bx in _binary(x, Tensor.scalar(k)):
        yield rule(bx, eq(dtype(x)).to(a)).then(set_(dtype(bx)).to(a))                             # a scalar keeps the dtype
    for f in (x ** k, unary(op, x), reduce(op, x, d, b), variance(x, d, e, b), mm(x, y), bmm(x, y),
              softmax(x, d), log_softmax(x, d), gelu(x, op), silu(x), layer_norm(x, y, z, e), rms_norm(x, y, e)):
        yield rule(f, eq(dtype(x)).to(a)).then(set_(dtype(f)).to(a))                               # dtype of x
    yield rule(addmm(z, x, y), eq(dtype(x)).to(a)).then(set_(dtype(addmm(z, x, y))).to(a))


analysis = shape_rules | dtype_rules
