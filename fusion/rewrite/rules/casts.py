"""Casts between float dtypes: `cast(x, "float32")` is `_to_copy(x, dtype=torch.float32)`.

    cast(x, dtype x) = x
    cast(cast(x, A), B) = cast(x, B)     when A holds every value of dtype(x) exactly
    cast(f(cast(x, float32)), dtype x) = f(x)   f = silu, erf/tanh gelu; x half or bfloat16

The chain rule needs A to be exact for x's dtype: then the first cast changes no value and the second
rounds the exact value once, as a direct cast does (bf16 -> f32 -> bf16 = identity, f16 -> f32 -> bf16 =
f16 -> bf16). f32 -> bf16 -> f32 rounds, so it is not an identity and nothing fires.
The last rule is how ATen computes silu and gelu on half types (in float32, rounding once at the end),
and how export's decomposition writes them; it gives back the one-kernel half-precision op.
"""
from __future__ import annotations

from collections.abc import Iterable

from egglog import RewriteOrRule, String, eq, rewrite, ruleset

from fusion.rewrite.egraph import Tensor, cast, dtype, gelu, silu

#: dtype -> the wider float dtypes that hold every one of its values exactly
EXACT_IN = {"bfloat16": ("float32", "float64"), "float16": ("float32", "float64"), "float32": ("float64",)}
HALF = ("bfloat16", "float16")


@ruleset
def cast_rules(x: Tensor, a: String, b: String) -> Iterable[RewriteOrRule]:
    yield rewrite(cast(x, a)).to(x, eq(dtype(x)).to(a))                                   # cast(x, dtype x) = x
    for src, wider in EXACT_IN.items():
        for mid in wider:
            yield rewrite(cast(cast(x, mid), b)).to(cast(x, b), eq(dtype(x)).to(String(src)))   # x -> wider -> b = x -> b
    for half in HALF:
        is_half = eq(dtype(x)).to(String(half))
        yield rewrite(cast(silu(cast(x, "float32")), half)).to(silu(x), is_half)             # silu in opmath = silu(x)
        for approx in ("none", "tanh"):     # not "quick": fusion.gelu_quick rounds after each of its ops
            yield rewrite(cast(gelu(cast(x, "float32"), approx), half)).to(gelu(x, approx), is_half)   # gelu in opmath
