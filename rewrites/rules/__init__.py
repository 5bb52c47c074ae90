"""Rule families, by name (the names `Config.disable_rules` accepts).

One family per module. `analysis` (shape/dtype) always runs; the others can be switched off.
"""
from __future__ import annotations

from egglog import Ruleset

from rewrites.rules.activations import gelu_rules, silu_rules
from rewrites.rules.algebra import algebra
from rewrites.rules.analysis import analysis
from rewrites.rules.attention import attention_family
from rewrites.rules.casts import cast_rules
from rewrites.rules.glu import glu_rules
from rewrites.rules.layer_norm import layer_norm_rules
from rewrites.rules.layout import layout_rules
from rewrites.rules.linear import linear_family
from rewrites.rules.rms_norm import rms_norm_rules
from rewrites.rules.softmax import softmax_rules

FAMILIES: dict[str, Ruleset] = {
    "algebra": algebra,
    "layout": layout_rules,
    "casts": cast_rules,
    "softmax": softmax_rules,
    "layer_norm": layer_norm_rules,
    "rms_norm": rms_norm_rules,
    "gelu": gelu_rules,
    "silu": silu_rules,
    "glu": glu_rules,
    "linear": linear_family,
    "attention": attention_family,
}

__all__ = ["FAMILIES", "analysis"]
