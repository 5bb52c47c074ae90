"""Attention: layout algebra (views, expand, transpose, flattened-batch bmm) and the attention fusion.

Real graphs reach attention through layers of views: `q @ k.transpose(-1, -2)` on 4-D tensors is
exported as expand + clone + view + bmm + view. Physical layout ops (`view`, `expand`, `permute`,
`unsqueeze`, `clone`) stay extractable; the rules below relate them to *logical* ops (`reshape_`,
`transpose_`, `matmul`, `repeat_kv`: value semantics only, never extracted), and the attention
rule matches the logical form. So a few composable identities cover BERT, GPT-2, LLaMA (GQA) and
hand-written attention, instead of one pattern per model:

    view(x, s) = reshape(x, s);  reshape(copy x) = reshape(x);  expand(x, shape x) = x
    reshape(bmm(reshape(a, [B*H, m, k]), reshape(b, [B*H, k, n])), [B, H, m, n]) = a @ b
    reshape(expand(unsqueeze(k, 2), [B, Hkv, g, L, D]), [B, Hkv*g, L, D]) = repeat_kv(k, g)
    (x*c) @ y = (x @ y)*c,  x @ (y*c) = (x @ y)*c,  reshape(x*c) = reshape(x)*c,  (x*c)^T = x^T*c

    softmax(mask + (q @ k^T)*c, -1) @ v = attention(q, k, v, mask, c)
    attention(q, repeat_kv(k, g), repeat_kv(v, g), ...) = attention(q, k, v, ...)   (grouped-query)

Side conditions (where SDPA's semantics could not express the eager program, nothing fires):
softmax over the last dim (the key dim); the scale a Python scalar (a tensor scale is a leaf, not
`scalar`); the mask of the scores' dtype, of rank >= 1, broadcasting to the scores without growing
them (the `add` keeps the scores' shape); q, k, v of rank 3 or 4. Boolean masks (`where(keep, s, fill)`,
`masked_fill(drop, fill)`) fire only with a constant fill <= finfo.min (HF's dtype-min, or -inf), and become
the additive mask `where(keep, 0, fill)`, which gives eager's result even on fully masked rows.
"""
from __future__ import annotations

from collections.abc import Iterable

from egglog import Bool, RewriteOrRule, String, Vec, eq, f64, i64, ne, rewrite, ruleset

from fusion.rewrite.egraph import NONE, Tensor, attention, bmm, c, clone, dtype, expand, fill_kind, matmul, permute, repeat_kv, reshape_, shape, softmax, transpose_, unsqueeze, view, where

FALSE = Bool(False)


@ruleset
def layout_rules(x: Tensor, y: Tensor, s: Vec[i64], t: Vec[i64], u: Vec[i64], a: Vec[i64], b: Vec[i64],
                 k: f64) -> Iterable[RewriteOrRule]:
    def batched(t: Vec[i64], u: Vec[i64], s: Vec[i64]):   # x: [B,H,m,k], y: [B,H,k,n] flattened to [B*H, ., .]
        return (eq(shape(x)).to(a), eq(a.length()).to(i64(4)), eq(shape(y)).to(b), eq(b.length()).to(i64(4)),
                eq(a[0]).to(b[0]), eq(a[1]).to(b[1]),
                eq(t).to(Vec[i64](a[0] * a[1], a[2], a[3])), eq(u).to(Vec[i64](b[0] * b[1], b[2], b[3])),
                eq(s).to(Vec[i64](a[0], a[1], a[2], b[3])))

    yield rewrite(expand(x, s)).to(x, eq(shape(x)).to(s))                                   # expand(x, shape x) = x
    yield rewrite(view(x, s)).to(reshape_(x, s))                                            # view = reshape (value)
    yield rewrite(reshape_(clone(x), s)).to(reshape_(x, s))                                 # reshape(copy x) = reshape(x)
    yield rewrite(reshape_(reshape_(x, s), t)).to(reshape_(x, t))                           # reshape(reshape(x)) = reshape(x)
    yield rewrite(reshape_(x, s)).to(x, eq(shape(x)).to(s))                                 # reshape(x, shape x) = x
    yield rewrite(bmm(x, y)).to(matmul(x, y))                                               # bmm = 3-D matmul
    yield rewrite(reshape_(bmm(reshape_(x, t), reshape_(y, u)), s)).to(
        matmul(x, y), *batched(t, u, s))                                                    # bmm over flattened batch = 4-D matmul
    yield rewrite(permute(x, Vec[i64](i64(0), i64(1), i64(3), i64(2)))).to(transpose_(x))   # swap last two (rank 4)
    yield rewrite(permute(x, s)).to(
        transpose_(permute(x, Vec[i64](s[0], s[1], s[3], s[2]))), eq(s.length()).to(i64(4)),
        ne(s).to(Vec[i64](i64(0), i64(1), i64(3), i64(2))))                                 # permute p = (permute p') ^T, p' = p, last two swapped
    yield rewrite(permute(x, Vec[i64](i64(0), i64(1), i64(2), i64(3)))).to(x)               # identity permute
    yield rewrite(permute(x, Vec[i64](i64(0), i64(2), i64(1)))).to(transpose_(x))           # swap last two (rank 3)
    yield rewrite(transpose_(transpose_(x))).to(x)                                          # (x^T)^T = x
    yield rewrite(matmul(x * c(k), y)).to(matmul(x, y) * c(k))                              # (x c) @ y = (x @ y) c
    yield rewrite(matmul(x, y * c(k))).to(matmul(x, y) * c(k))                              # x @ (y c) = (x @ y) c
    yield rewrite(bmm(x * c(k), y)).to(bmm(x, y) * c(k))                                    # (x c) @ y = (x @ y) c
    yield rewrite(bmm(x, y * c(k))).to(bmm(x, y) * c(k))                                    # x @ (y c) = (x @ y) c
    yield rewrite(reshape_(x * c(k), s)).to(reshape_(x, s) * c(k))                          # reshape(x c) = reshape(x) c
    yield rewrite(transpose_(x * c(k))).to(transpose_(x) * c(k))                            # (x c)^T = x^T c
    yield rewrite(clone(x * c(k))).to(clone(x) * c(k))                                      # copy(x c) = copy(x) c
    # a flattened batch [B*H, m, n] (Bloom's baddbmm scores): its transpose and a broadcast add split with it
    yield rewrite(transpose_(reshape_(x, t))).to(
        reshape_(transpose_(x), Vec[i64](t[0], t[2], t[1])),
        eq(shape(x)).to(a), eq(a.length()).to(i64(4)), eq(t).to(Vec[i64](a[0] * a[1], a[2], a[3])))    # (reshape x)^T = reshape(x^T)
    yield rewrite(reshape_(x + y, s)).to(
        view(x, Vec[i64](s[0], s[1], a[1], a[2])) + reshape_(y, s),
        eq(shape(y)).to(b), eq(b.length()).to(i64(3)), eq(shape(x + y)).to(b), eq(shape(x)).to(a),
        eq(a.length()).to(i64(3)), eq(a[0]).to(b[0]), eq(s.length()).to(i64(4)), eq(s[0] * s[1]).to(b[0]),
        eq(s[2]).to(b[1]), eq(s[3]).to(b[2]))          # reshape(m + y) = view(m) + reshape(y), m: [B*H, 1|m, 1|n] (a split of dim 0: always a view)


@ruleset
def repeat_kv_rules(x: Tensor, s: Vec[i64], t: Vec[i64], a: Vec[i64]) -> Iterable[RewriteOrRule]:
    yield rewrite(reshape_(expand(unsqueeze(x, 2), t), s)).to(
        repeat_kv(x, t[2]),
        eq(shape(x)).to(a), eq(a.length()).to(i64(4)),
        eq(t).to(Vec[i64](a[0], a[1], t[2], a[2], a[3])),
        eq(s).to(Vec[i64](a[0], a[1] * t[2], a[2], a[3])))                                   # expand+reshape of kv heads = repeat_kv


@ruleset
def attention_rules(q: Tensor, kk: Tensor, v: Tensor, m: Tensor, m2: Tensor, mb: Tensor, f: Tensor, d: i64, sc: f64,
                    g: i64, s: Vec[i64], ms: Vec[i64], ms2: Vec[i64], mbs: Vec[i64], qs: Vec[i64],
                    causal: Bool) -> Iterable[RewriteOrRule]:
    scores = matmul(q, transpose_(kk)) * c(sc)
    key_dim = (eq(shape(scores)).to(s), eq(d).to(s.length() - 1), eq(shape(q)).to(qs), qs.length() >= i64(3))
    def mask_ok(total: Tensor):  # m broadcasts to the scores without growing them; rank >= 2 (fusion.attention)
        return (eq(shape(total)).to(s), eq(shape(m)).to(ms), ms.length() >= i64(2))

    yield rewrite(matmul(q, transpose_(kk))).to(matmul(q, transpose_(kk)) * c(1.0))           # q k^T = (q k^T)*1
    yield rewrite(matmul(softmax(scores, d), v)).to(
        attention(q, kk, v, NONE, sc, FALSE), *key_dim)                                     # softmax(q k^T c) v
    yield rewrite(matmul(softmax(m + scores, d), v)).to(
        attention(q, kk, v, m, sc, FALSE), *key_dim, *mask_ok(m + scores))                   # softmax(m + q k^T c) v
    yield rewrite(matmul(softmax(scores + m, d), v)).to(
        attention(q, kk, v, m, sc, FALSE), *key_dim, *mask_ok(scores + m))                   # softmax(q k^T c + m) v
    def bool_mask_ok(total: Tensor):  # m: bool, rank >= 2, broadcasts without growing; f: a -inf / dtype-min fill
        return (eq(shape(total)).to(s), eq(shape(m)).to(ms), ms.length() >= i64(2), eq(dtype(m)).to(String("bool")),
                eq(fill_kind(f)).to(String("neg_big")))
    # where(keep, s, fill) = s + where(keep, 0, fill) exactly: s + fill rounds to fill (|s| << 1e38), -inf stays -inf
    yield rewrite(matmul(softmax(where(m, scores, f), d), v)).to(
        attention(q, kk, v, where(m, c(0.0), f), sc, FALSE), *key_dim, *bool_mask_ok(where(m, scores, f)))   # keep-mask
    yield rewrite(matmul(softmax(where(m, f, scores), d), v)).to(
        attention(q, kk, v, where(m, f, c(0.0)), sc, FALSE), *key_dim, *bool_mask_ok(where(m, f, scores)))   # masked_fill
    # two masks (T5: position bias + padding mask; Bloom: alibi + causal mask; GPT-Neo: causal where + padding)
    def masks_ok(inner: Tensor, total: Tensor):   # each mask rank >= 2; neither add grows the scores
        return (eq(shape(inner)).to(s), eq(shape(total)).to(s), eq(shape(m)).to(ms), ms.length() >= i64(2),
                eq(shape(m2)).to(ms2), ms2.length() >= i64(2))
    for inner, mask in ((m + scores, m), (scores + m, m)):
        for total in (inner + m2, m2 + inner):
            yield rewrite(matmul(softmax(total, d), v)).to(
                attention(q, kk, v, mask + m2, sc, FALSE), *key_dim, *masks_ok(inner, total))   # softmax(q k^T c + m + m2) v
    for inner, mask in ((where(mb, scores, f), where(mb, c(0.0), f)), (where(mb, f, scores), where(mb, f, c(0.0)))):
        for total in (inner + m2, m2 + inner):
            yield rewrite(matmul(softmax(total, d), v)).to(
                attention(q, kk, v, mask + m2, sc, FALSE), *key_dim, *masks_ok(inner, total),
                eq(dtype(mb)).to(String("bool")), eq(fill_kind(f)).to(String("neg_big")),
                eq(shape(mb)).to(mbs), mbs.length() >= i64(2))                                    # where-mask, then an additive one
    yield rewrite(attention(q, repeat_kv(kk, g), repeat_kv(v, g), m, sc, causal)).to(
        attention(q, kk, v, m, sc, causal))                                                 # shared kv heads: GQA form


attention_family = layout_rules | repeat_kv_rules | attention_rules
