"""Gated linear units: `act(g) * u` is one fused op, `glu(g, u, act)` (FX: `fusion.swiglu`, `fusion.geglu`).

SwiGLU (LLaMA, Mistral: `down(silu(gate(x)) * up(x))`) and GeGLU (T5 v1.1 / Gemma: erf or tanh GELU).
The activation is matched in its fused form, so whatever form the silu/gelu families recognise
(`g * sigmoid(g)`, `0.5 g (1 + erf(g / sqrt 2))`, ...) reaches the GLU. Products are inserted
earlier-defined operand first, and gate and up projections come in either order, so both
orientations of the product are listed (there are no commutativity rules).

Side conditions: u does not grow the result (the product has g's shape; u may broadcast to it) and
u is a tensor of rank >= 1 (a Python scalar is `x * c`, not a gate).
"""
from __future__ import annotations

from collections.abc import Iterable

from egglog import RewriteOrRule, Vec, eq, i64, rewrite, ruleset

from fusion.rewrite.egraph import Tensor, gelu, glu, shape, silu


@ruleset
def glu_rules(g: Tensor, u: Tensor, s: Vec[i64], t: Vec[i64]) -> Iterable[RewriteOrRule]:
    def gate(prod: Tensor):  # act(g) * u keeps g's shape; u is a tensor (rank >= 1), not a scalar
        return eq(shape(prod)).to(s), eq(shape(g)).to(s), eq(shape(u)).to(t), t.length() > i64(0)

    for act, name in ((silu(g), "silu"), (gelu(g, "none"), "gelu"), (gelu(g, "tanh"), "gelu_tanh")):
        yield rewrite(act * u).to(glu(g, u, name), *gate(act * u))               # act(g)*u = glu(g, u)
        yield rewrite(u * act).to(glu(g, u, name), *gate(u * act))               # u*act(g) = glu(g, u)
