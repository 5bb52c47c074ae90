"""The models the approximate-rewrite tests share (tests/test_approx.py, tests/test_approx_compile.py)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class Block(nn.Module):
    """A transformer-ish block: q/k/v linears, softmax(q k^T) attention, MLP."""

    def __init__(self, d=64, heads=4):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def attn(self, x, relu=False):
        b, t, d = x.shape
        sh = lambda y: y.view(b, t, self.h, d // self.h).transpose(1, 2)
        q, k, v = sh(self.q(x)), sh(self.k(x)), sh(self.v(x))
        s = q @ k.transpose(-1, -2) / math.sqrt(d // self.h)
        p = torch.relu(s) / t if relu else torch.softmax(s, dim=-1)
        return self.o((p @ v).transpose(1, 2).reshape(b, t, d))

    def forward(self, x, relu: bool = False):
        x = x + self.attn(x, relu)
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class ReluRef(nn.Module):
    """The same weights, run with ReLU attention: what the relu_attention rule must compute."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x, relu=True)
