"""Built-in proxy workloads: transformer blocks written the way model code writes them by hand.

They exercise every exact rewrite family (softmax with masks, layer norm, RMSNorm, erf and tanh GELU,
SiLU/SwiGLU) and are what `python -m fusion demo|optimize|analyze|bench` run by name (bert, gpt2, llama).
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


class GPT2Block(nn.Module):
    """Pre-LN decoder block as GPT-2 writes it: nn.LayerNorm, one fused q/k/v projection split in three,
    causal mask by torch.where on a lower-triangular buffer, the tanh GELU written out (gelu_new)."""

    def __init__(self, d: int = 768, heads: int = 12, ffn: int = 3072, max_positions: int = 2048):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, ffn), nn.Linear(ffn, d)
        causal = torch.ones(max_positions, max_positions, dtype=torch.bool).tril()
        self.register_buffer("bias", causal.view(1, 1, max_positions, max_positions), persistent=False)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = (t.view(B, S, self.h, self.dh).transpose(1, 2) for t in self.c_attn(self.ln_1(x)).split(D, dim=2))
        w = (q @ k.transpose(-1, -2)) / math.sqrt(self.dh)
        w = torch.where(self.bias[:, :, :S, :S], w, torch.finfo(w.dtype).min)
        a = (w.softmax(-1) @ v).transpose(1, 2).reshape(B, S, D)
        x = x + self.c_proj(a)
        h = self.c_fc(self.ln_2(x))
        h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))
        return x + self.mlp_proj(h)


def bert_block_inputs(batch: int = 4, seq: int = 128, d: int = 768) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, seq, d)
    keep = torch.ones(batch, seq)
    keep[:, seq - seq // 8:] = 0  # padded tail
    mask = (1.0 - keep[:, None, None, :]) * -10000.0
    return x, mask


WORKLOADS = {
    "bert": (lambda: BertBlock(), lambda: bert_block_inputs()),
    "gpt2": (lambda: GPT2Block(), lambda: (torch.randn(4, 128, 768),)),
    "llama": (lambda: LlamaBlock(), lambda: (torch.randn(4, 128, 512),)),
}
