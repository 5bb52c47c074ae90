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

from fusion.rewrite.egraph import Tensor, addmm, attention, bmm, cast, clone, dtype, expand, gelu, glu, layer_norm, log_softmax, matmul, mm, permute, reduce, repeat_kv, reshape_, rms_norm, shape, silu, softmax, transpose_, unary, unsqueeze, variance, view, where

SCALAR_SHAPE = Vec[i64].empty()


def _binary(x: Tensor, y: Tensor) -> list[Tensor]:
    return [x + y, x - y, x * y, x / y]


@ruleset
def shape_rules(
    x: Tensor, y: Tensor, z: Tensor, s: Vec[i64], t: Vec[i64], op: String, d: i64, k: f64, e: f64,
    a: String, w: Tensor, flag: Bool,
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
    for f in (softmax(x, d), log_softmax(x, d), gelu(x, a), silu(x), layer_norm(x, y, z, e), rms_norm(x, y, e), clone(x),
              cast(x, a)):
        yield rule(f, eq(shape(x)).to(s)).then(set_(shape(f)).to(s))                               # fused ops keep x's shape
    for f in (view(x, s), expand(x, s), reshape_(x, s)):
        yield rule(f).then(set_(shape(f)).to(s))                                                   # views carry their shape
    for r in range(1, 7):   # permute(x, p) : [s[p[0]], ..., s[p[r-1]]]
        yield rule(permute(x, t), eq(shape(x)).to(s), eq(s.length()).to(i64(r)), eq(t.length()).to(i64(r))).then(
            set_(shape(permute(x, t))).to(Vec[i64](*(s[t[i64(i)]] for i in range(r)))))
    for r in (3, 4):  # logical ops of attention, rank 3 and 4 only (no rule builds others)
        last, prev = i64(r - 1), i64(r - 2)
        rank_r = (eq(shape(x)).to(s), eq(s.length()).to(i64(r)))
        yield rule(transpose_(x), *rank_r).then(
            set_(shape(transpose_(x))).to(s.set(last, s[prev]).set(prev, s[last])))                # [.., m, n]^T : [.., n, m]
        yield rule(matmul(x, y), *rank_r, eq(shape(y)).to(t)).then(
            set_(shape(matmul(x, y))).to(s.set(last, t[last])))                                     # [.., m, k]@[.., k, n] : [.., m, n]
        yield rule(attention(x, y, z, w, e, flag), *rank_r, eq(shape(z)).to(t)).then(
            set_(shape(attention(x, y, z, w, e, flag))).to(s.set(last, t[last])))                      # q [.., S, D], v [.., L, Dv] : [.., S, Dv]
    for wh in (where(x, Tensor.scalar(k), y), where(x, y, Tensor.scalar(k))):   # an additive mask built from a bool one
        yield rule(wh, eq(shape(x)).to(s), eq(shape(y)).to(SCALAR_SHAPE)).then(set_(shape(wh)).to(s))
    yield rule(glu(x, y, a), eq(shape(x)).to(s)).then(set_(shape(glu(x, y, a))).to(s))          # act(g)*u : shape(g) (u never grows it)
    yield rule(where(x, y, z), eq(shape(x)).to(s), eq(shape(y)).to(s), eq(shape(z)).to(s)).then(
        set_(shape(where(x, y, z))).to(s))
    yield rule(repeat_kv(x, d), eq(shape(x)).to(s), eq(s.length()).to(i64(4))).then(
        set_(shape(repeat_kv(x, d))).to(s.set(i64(1), s[1] * d)))                                  # [B, H, L, D] : [B, H*g, L, D]


@ruleset
def dtype_rules(x: Tensor, y: Tensor, z: Tensor, w: Tensor, op: String, d: i64, k: f64, e: f64, a: String, b: Bool,
                s: Vec[i64]) -> Iterable[RewriteOrRule]:
    for bx in _binary(x, y):
        yield rule(bx, eq(dtype(x)).to(a), eq(dtype(y)).to(a)).then(set_(dtype(bx)).to(a))          # same dtypes
    for bx in _binary(x, Tensor.scalar(k)):
        yield rule(bx, eq(dtype(x)).to(a)).then(set_(dtype(bx)).to(a))                             # a scalar keeps the dtype
    for f in (x ** k, unary(op, x), reduce(op, x, d, b), variance(x, d, e, b), mm(x, y), bmm(x, y),
              softmax(x, d), log_softmax(x, d), gelu(x, op), silu(x), layer_norm(x, y, z, e), rms_norm(x, y, e),
              view(x, s), expand(x, s), permute(x, s), unsqueeze(x, d), clone(x), reshape_(x, s), transpose_(x),
              matmul(x, y), repeat_kv(x, d), attention(x, y, z, w, k, b), glu(x, y, op)):
        yield rule(f, eq(dtype(x)).to(a)).then(set_(dtype(f)).to(a))                               # dtype of x
    yield rule(addmm(z, x, y), eq(dtype(x)).to(a)).then(set_(dtype(addmm(z, x, y))).to(a))
    yield rule(cast(x, a)).then(set_(dtype(cast(x, a))).to(a))                                       # cast(x, a) : a
    for wh in (where(z, x, Tensor.scalar(k)), where(z, Tensor.scalar(k), x), where(z, x, y)):
        yield rule(wh, eq(dtype(x)).to(a)).then(set_(dtype(wh)).to(a))                             # dtype of the value operand


analysis = shape_rules | dtype_rules
