"""Built-in proxy workloads: transformer blocks written the way model code writes them by hand.

They exercise every exact rewrite family (softmax with masks, layer norm, RMSNorm, GELU, SiLU/SwiGLU)
and are what `python -m fusion demo|analyze|bench` run when no user model is given.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class BertBlock(nn.Module):
    """Post-LN encoder block: attention with an additive padding mask, hand-written layer norm, erf GELU."""

    def __init__(self, d: int = 768, heads: int = 12, ffn: int = 3072):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.w1, self.b1 = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))
        self.w2, self.b2 = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))

    @staticmethod
    def layer_norm(x, w, b, eps=1e-12):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * w + b

    def forward(self, x, mask):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / math.sqrt(self.dh) + mask
        s = s - s.amax(-1, keepdim=True)
        p = s.exp() / s.exp().sum(-1, keepdim=True)
        a = (p @ v).transpose(1, 2).reshape(B, S, D)
        x = self.layer_norm(x + self.proj(a), self.w1, self.b1)
        h = self.fc1(x)
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
        return self.layer_norm(x + self.fc2(h), self.w2, self.b2)


class LlamaBlock(nn.Module):
    """Pre-norm decoder block: RMSNorm, causal softmax attention, SwiGLU MLP."""

    def __init__(self, d: int = 512, heads: int = 8, ffn: int = 1408):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.gate, self.up = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)
        self.n1, self.n2 = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))

    @staticmethod
    def rms_norm(x, w, eps=1e-6):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(self.rms_norm(x, self.n1)).view(B, S, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.dh))
        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        s = s.masked_fill(~causal, float("-inf"))
        p = torch.softmax(s, dim=-1)
        x = x + self.o((p @ v).transpose(1, 2).reshape(B, S, D))
        h = self.rms_norm(x, self.n2)
        g = self.gate(h)
        return x + self.down(g * torch.sigmoid(g) * self.up(h))


def bert_block_inputs(batch: int = 4, seq: int = 128, d: int = 768) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, seq, d)
    keep = torch.ones(batch, seq)
    keep[:, seq - seq // 8:] = 0  # padded tail
    mask = (1.0 - keep[:, None, None, :]) * -10000.0
    return x, mask


WORKLOADS = {
    "bert": (lambda: BertBlock(), lambda: bert_block_inputs()),
    "llama": (lambda: LlamaBlock(), lambda: (torch.randn(4, 128, 512),)),
}
