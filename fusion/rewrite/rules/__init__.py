"""Rule families, by name (the names `Config.disable_rules` accepts).

One family per module. `analysis` (shape/dtype) always runs; the others can be switched off.
"""
from __future__ import annotations

from egglog import Ruleset

from fusion.rewrite.rules.activations import gelu_rules, silu_rules
from fusion.rewrite.rules.algebra import algebra
from fusion.rewrite.rules.analysis import analysis
from fusion.rewrite.rules.attention import attention_family
from fusion.rewrite.rules.casts import cast_rules
from fusion.rewrite.rules.glu import glu_rules
from fusion.rewrite.rules.layer_norm import layer_norm_rules
from fusion.rewrite.rules.layout import layout_rules
from fusion.rewrite.rules.linear import linear_family
from fusion.rewrite.rules.rms_norm import rms_norm_rules
from fusion.rewrite.rules.softmax import softmax_rules

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
