"""Layout simplification: compositions of physical views, identity views, no-op copies.

Every rule here unions two *physical* forms with the same memory layout (README: a physical view is
never unioned with a tensor of another layout), so extraction may emit either:

    permute(permute(x, p), q) = permute(x, p[q])     permute(x, identity) = x
    view(view(x, s), t) = view(x, t)                  view(x, shape x) = x
    view(unsqueeze(x, d), t) = view(x, t)             expand(expand(x, s), t) = expand(x, t)
    clone(clone(x)) = clone(x)                        clone(x) = x   when x is contiguous

A view of a view maps index -> storage offset exactly as one view of x does (both read x's elements in
row-major order), so the one view is valid whenever the two were. `clone` here is a contiguous copy
(rebuild emits `memory_format=torch.contiguous_format`): it is a no-op exactly on a contiguous x, which
the `contig` fact says (set from FX meta at insertion, derived for copies and matrix products).
The logical counterparts (`reshape_`, `transpose_`) live in the attention family.
"""
from __future__ import annotations

from collections.abc import Iterable

from egglog import RewriteOrRule, Vec, eq, i64, rewrite, rule, ruleset, set_

from fusion.rewrite.egraph import TRUE, Tensor, addmm, bmm, clone, contig, expand, mm, permute, shape, unsqueeze, view

MAX_RANK = 6


@ruleset
def layout_simplify(x: Tensor, y: Tensor, z: Tensor, p: Vec[i64], q: Vec[i64], s: Vec[i64], t: Vec[i64],
                    d: i64) -> Iterable[RewriteOrRule]:
    for r in range(1, MAX_RANK + 1):
        yield rewrite(permute(x, Vec[i64](*(i64(i) for i in range(r))))).to(x)                 # permute(x, id) = x
        if r >= 2:
            yield rewrite(permute(permute(x, p), q)).to(
                permute(x, Vec[i64](*(p[q[i64(i)]] for i in range(r)))),
                eq(p.length()).to(i64(r)), eq(q.length()).to(i64(r)))                          # permute(permute(x, p), q) = permute(x, p[q])
    yield rewrite(view(view(x, s), t)).to(view(x, t))                                          # view(view(x)) = view(x)
    yield rewrite(view(x, s)).to(x, eq(shape(x)).to(s))                                        # view(x, shape x) = x
    yield rewrite(view(unsqueeze(x, d), t)).to(view(x, t))                                     # view(unsqueeze(x)) = view(x)
    yield rewrite(expand(expand(x, s), t)).to(expand(x, t))                                    # expand(expand(x)) = expand(x)
    yield rewrite(clone(clone(x))).to(clone(x))                                                # copy(copy x) = copy x
    yield rewrite(clone(x)).to(x, eq(contig(x)).to(TRUE))                                      # copy x = x  (x contiguous)


@ruleset
def contig_rules(x: Tensor, y: Tensor, z: Tensor, s: Vec[i64]) -> Iterable[RewriteOrRule]:
    """Which new terms are contiguous: copies, matrix products, and views of contiguous tensors."""
    for f in (clone(x), mm(x, y), bmm(x, y), addmm(z, x, y)):
        yield rule(f).then(set_(contig(f)).to(TRUE))
    yield rule(view(x, s), eq(contig(x)).to(TRUE)).then(set_(contig(view(x, s))).to(TRUE))


layout_rules = layout_simplify | contig_rules
