"""The attention form is measured per shape (fusion/passes/attention.py): SDPA vs two batched GEMMs +
softmax, remembered per CPU; the decomposition computes the same function (masks, causal, grouped-query)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusion.costmodel import tuning
from fusion.passes.attention import AttentionTuner, _proxy, decomposed_attention

from .conftest import rel_err

CASES = [  # q, k/v, mask shape, mask dtype, causal
    ((2, 4, 16, 32), (2, 4, 16, 32), None, None, False),
    ((2, 4, 16, 32), (2, 4, 16, 32), None, None, True),
    ((2, 4, 16, 32), (2, 4, 24, 32), (2, 1, 1, 24), torch.float32, False),   # padding mask, L != S
    ((2, 4, 16, 32), (2, 4, 16, 32), (16, 16), torch.bool, False),
    ((2, 8, 16, 32), (2, 2, 16, 32), (1, 1, 16, 16), torch.float32, True),   # grouped-query heads, both masks
    ((8, 16, 32), (8, 16, 32), None, None, False),                           # 3-D
]


@pytest.mark.parametrize("q_shape, kv_shape, mask_shape, mask_dtype, causal", CASES)
def test_decomposition_is_the_same_function(q_shape, kv_shape, mask_shape, mask_dtype, causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=g) for s in (q_shape, kv_shape, kv_shape))
    mask = None
    if mask_dtype is torch.bool:
        mask = torch.rand(mask_shape, generator=g) > 0.2
        mask[..., 0] = True                                   # no fully masked row
    elif mask_dtype is not None:
        mask = torch.randn(mask_shape, generator=g)
    scale = 0.17
    ref = torch.ops.fusion.attention.default(q, k, v, mask, scale, causal)
    eager = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                           enable_gqa=q.shape[-3] != k.shape[-3])
    assert rel_err(ref, eager) <= 1e-5
    assert rel_err(decomposed_attention(q, k, v, mask, scale, causal), ref) <= 1e-5


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_fully_masked_rows_are_zero_as_sdpa_gives(mask_dtype):
    """A row whose every key is masked: SDPA returns 0 there (softmax alone would give nan), and so must the
    decomposition the pass may pick instead."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 32, generator=g) for _ in range(3))
    keep = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    keep[0, ..., 11:] = False          # key padding
    keep[1, :, 3, :] = False           # one query row sees nothing
    mask = keep if mask_dtype is torch.bool else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.17)
    out = decomposed_attention(q, k, v, mask, 0.17, False)
    assert torch.isfinite(out).all() and (out[1, :, 3] == 0).all()
    assert rel_err(out, ref) <= 1e-5


def test_big_calls_are_timed_on_fewer_rows_within_the_memory_cap():
    # GPT-2 s2048: [1, 12, 2048, 64]: the scores alone are 200 MB -> one head's worth is timed, x12
    (pq, pk, pv, pm), share = _proxy((1, 12, 2048, 64), (1, 12, 2048, 64), (1, 12, 2048, 64), None, 4)
    assert pq[1] < 12 and share == pytest.approx(12 / pq[1])
    assert 4 * (2 * pq[1] * 2048 * 2048) <= tuning.MAX_MEASURE_BYTES
    # grouped-query: q heads fold with their kv head, a [B, 1, S, L] mask keeps its shape
    (pq, pk, _, pm), share = _proxy((4, 16, 1024, 64), (4, 4, 1024, 64), (4, 4, 1024, 64), (4, 1, 1024, 1024), 4)
    assert pq[1] == 4 * pk[1] and pm[1] == 1 and pm[0] == pq[0] and share == pytest.approx(16 / (pq[0] * pk[1]))


class Attn(nn.Module):
    def forward(self, x):                                   # [B, S, H*D] -> heads -> SDPA -> back
        q = x.view(2, 32, 4, 16).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q * 0.5, q, is_causal=True).transpose(1, 2).reshape(2, 32, 64)


def fake(tmp_path, winner: str) -> str:
    """A tuning record that says `winner` is 3x faster at the model's one attention call."""
    key = AttentionTuner.key((2, 4, 32, 16), (2, 4, 32, 16), (2, 4, 32, 16), None, "None", True, "float32")
    tuning.record("attention", key, {winner: 1e-5, ("sdpa" if winner == "decomposed" else "decomposed"): 3e-5},
                  str(tmp_path), how="test")
    return str(tmp_path)


@pytest.mark.parametrize("winner", ["sdpa", "decomposed"])
def test_the_measured_form_runs(tmp_path, winner):
    import fusion

    x = torch.randn(2, 32, 64)
    opt = fusion.optimize(Attn(), (x,), config=fusion.Config(cache_dir=fake(tmp_path, winner), structural_cache=False))
    forms = opt.graphs[0].log.attention_forms
    assert forms == ({"sdpa": 0, "decomposed": 1} if winner == "decomposed" else {"sdpa": 1, "decomposed": 0})
    assert ("decomposed_attention" in opt.code) is (winner == "decomposed")
    assert "attention: " in opt.explain()
    assert rel_err(opt(x), Attn()(x)) <= 1e-4


def test_measured_once_per_machine(tmp_path):
    import fusion

    x = torch.randn(2, 32, 64)
    cfg = fusion.Config(cache_dir=str(tmp_path), structural_cache=False)
    fusion.optimize(Attn(), (x,), config=cfg)
    key = AttentionTuner.key((2, 4, 32, 16), (2, 4, 32, 16), (2, 4, 32, 16), None, "None", True, "float32")
    times = tuning.lookup("attention", key, str(tmp_path))
    assert times is not None and set(times) == {"sdpa", "decomposed"}
    assert fusion.optimize(Attn(), (x,), config=fusion.Config(cache_dir=str(tmp_path), structural_cache=False,
                                                              tune=False)).graphs[0].log.attention_forms["sdpa"] == 1


class HFStyleAttention(nn.Module):
    """As HF LLaMA/GPT-2 with SDPA: heads out of SDPA, `.transpose(1, 2).contiguous()`, a view, a linear."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(768, 3 * 768), nn.Linear(768, 768)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 12, 64).permute(2, 0, 3, 1, 4)
        q, k = q * 0.5 + 0.25, k * 0.75 - 0.5   # as rotary embeddings: a fused kernel writes them contiguous
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).contiguous().view(b, s, 768))


@pytest.mark.parametrize("how", ["optimize", "torch.compile"])
def test_views_of_attention_hold_for_every_sdpa_layout(how):
    """SDPA's output follows q's memory order: traced on the model's transposed q it is [B, S, H, D] in
    memory, so export and AOTAutograd drop the model's `.contiguous()`; in the program a fused kernel
    writes q contiguous, SDPA returns a contiguous [B, H, S, D], and the view of its transpose failed at run
    time (HF LLaMA fell back to eager). The copy is kept where either layout needs it."""
    import fusion

    torch.manual_seed(0)
    m, x = HFStyleAttention().eval(), torch.randn(2, 64, 768)
    if how == "optimize":
        opt = fusion.optimize(m, (x,), config=fusion.Config(fallback=False, structural_cache=False))
    else:
        torch._dynamo.reset()
        opt = torch.compile(m, backend="fusion", options={"fallback": False})
    with torch.no_grad():
        assert rel_err(opt(x), m(x)) <= 1e-4
