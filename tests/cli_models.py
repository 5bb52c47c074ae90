"""Model factories for the CLI tests (`python -m fusion analyze tests.cli_models:tiny`)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class TinyDecoder(nn.Module):
    """A small pre-norm causal attention block with grouped-query attention (repeat_kv) and a GELU MLP."""

    def __init__(self, d: int = 64, heads: int = 4, kv_heads: int = 2, ffn: int = 128):
        super().__init__()
        self.h, self.kvh, self.dh = heads, kv_heads, d // heads
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d, 2 * kv_heads * self.dh, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def repeat_kv(self, t: torch.Tensor) -> torch.Tensor:   # [B, kvh, S, dh] -> [B, h, S, dh], as HF writes it
        B, _, S, D = t.shape
        rep = self.h // self.kvh
        return t[:, :, None, :, :].expand(B, self.kvh, rep, S, D).reshape(B, self.h, S, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        h = self.ln1(x)
        q = self.q(h).view(B, S, self.h, self.dh).transpose(1, 2)
        k, v = self.kv(h).view(B, S, 2, self.kvh, self.dh).permute(2, 0, 3, 1, 4)
        k, v = self.repeat_kv(k), self.repeat_kv(v)
        s = q @ k.transpose(-1, -2) / math.sqrt(self.dh)
        s = s.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
        x = x + self.o((s.softmax(-1) @ v).transpose(1, 2).reshape(B, S, D))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


def tiny():
    """(model, example_inputs): batch 2, sequence 32, width 64."""
    torch.manual_seed(0)
    return TinyDecoder().eval(), (torch.randn(2, 32, 64),)


def tiny_model_only():
    """A model alone: the CLI needs --input-shape."""
    torch.manual_seed(0)
    return TinyDecoder().eval()


def not_a_model():
    return 42
