"""Capture keeps `F.scaled_dot_product_attention` whole: it becomes `fusion.attention` (SDPA at run time), not
its decomposition (two bmm + softmax + the fully-masked-row guard), in every form SDPA takes."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fusion
from fusion.capture import capture_module

ATTN = torch.ops.fusion.attention.default


class Attn(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kw) * 2.0


def _case(kw, mask, hk=4):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, 8)
    k, v = torch.randn(2, hk, 16, 8), torch.randn(2, hk, 16, 8)
    return Attn(**kw).eval(), (q, k, v) + ((mask,) if mask is not None else ())


def _keep_mask():
    keep = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    keep[0, ..., 11:] = False    # key padding
    keep[1, ..., :] = False      # a fully masked batch element: SDPA gives 0 rows
    return keep


CASES = {
    "bool_mask_fully_masked_rows": ({}, _keep_mask()),
    "additive_mask_and_scale": ({"scale": 0.3}, torch.randn(2, 1, 16, 16)),
    "causal": ({"is_causal": True}, None),
    "gqa": ({"enable_gqa": True}, None),
}


def test_sdpa_becomes_fusion_attention_and_matches_eager():
    for name, (kw, mask) in CASES.items():
        model, args = _case(kw, mask, hk=2 if kw.get("enable_gqa") else 4)
        cap = capture_module(model, args)
        targets = [n.target for n in cap.gm.graph.nodes if n.op == "call_function"]
        assert ATTN in targets and torch.ops.aten.bmm.default not in targets, name
        with torch.no_grad():
            ref = model(*args)
            out = fusion.optimize(model, args)(*args)
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), name
        assert torch.isfinite(out).all(), name


def test_sdpa_with_dropout_keeps_the_aten_op():
    model, args = _case({"dropout_p": 0.5}, None)
    cap = capture_module(model, args)
    targets = [n.target for n in cap.gm.graph.nodes if n.op == "call_function"]
    assert ATTN not in targets


def test_rebuilt_clone_is_contiguous():
    """The e-graph's `clone` makes its input contiguous (export's clone before a view): rebuilt with ATen's
    default memory format it kept a permuted input's strides, and the `view` after it failed at run time
    (all-MiniLM-L6-v2's decomposed attention, before capture kept SDPA)."""
    from fusion.extract.ilp import ENode, Ref
    from fusion.rewrite.rebuild import call_of

    target, args, kwargs = call_of(ENode.make(0, 0, "clone", (Ref(1),)), ["x"])
    assert target is torch.ops.aten.clone.default and kwargs == {"memory_format": torch.contiguous_format}
    x = torch.randn(4, 8).t()
    assert target(x, **kwargs).view(32).shape == (32,)
