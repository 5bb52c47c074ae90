"""The micro cases, defined once: small fp32 programs (softmax, RMSNorm, layer norm, GELU + bias + residual,
SwiGLU, masked scaled softmax) and how their inputs are shaped.

    case = MICRO["softmax"]
    fn, inputs = case.fn, case.inputs()                  # the benchmark size, seed 0
    case.inputs((256, 1024)), case.input_shapes((8, 64))  # other sizes

In: a size (the shape of the main operand; the other operands follow from it). Out: the function and its
inputs. Users: bench/cases.py (the CPU benchmark, `MICRO[name].shape` sizes, case names as in
BENCHMARKS.md), bench/gpu.py (fp16, its own labels and --dry-run sizes) and fusion/analysis/validate.py
(three sizes per case, its own family names). Imports only torch (fusion.workloads is a low layer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F


class FunctionModule(torch.nn.Module):
    """A plain function as a module (torch.export, torch.onnx.export and fusion.optimize take modules)."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


# ---------------------------------------------------------------------------------------------- programs
def softmax_hand(x):
    m = x.amax(-1, keepdim=True)
    e = (x - m).exp()
    return e / e.sum(-1, keepdim=True)


def softmax_values(x):
    m = x.max(-1, keepdim=True).values      # values and indices; the indices unused
    e = torch.exp(x - m)
    return e / e.sum(-1, keepdim=True)


def rmsnorm_llama(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def layernorm_F(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def layernorm_hand(x, w, b):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * w + b


def gelu_bias_residual(x, b, r):
    return F.gelu(x + b) + r


def swiglu(g, a):
    return F.silu(g) * a


def attn_softmax(s, mask):
    return torch.softmax(s * 0.125 + mask, -1)


# ---------------------------------------------------------------------------------------------- inputs
def dims(shape: tuple) -> str:
    """(8192, 1024) -> "8192x1024", the way case names and descriptions write sizes."""
    return "x".join(map(str, shape))


def causal_mask(mask_shape: tuple) -> torch.Tensor:
    """Additive causal mask of `mask_shape` ([..., L, L]): 0 on/below the diagonal, -1e4 above."""
    L = mask_shape[-1]
    return torch.triu(torch.full((L, L), -1e4), 1).expand(*mask_shape).contiguous()


def random_inputs(shapes: list[tuple], generator: torch.Generator,
                  mask_shape: Optional[tuple] = None) -> tuple[torch.Tensor, ...]:
    """One standard-normal tensor per shape, drawn in order from `generator`, then (mask_shape given) the
    causal mask, which draws nothing."""
    ins = [torch.randn(*s, generator=generator) for s in shapes]
    if mask_shape is not None:
        ins.append(causal_mask(mask_shape))
    return tuple(ins)


@dataclass(frozen=True)
class Micro:
    """One micro case. `operands`: one letter per input, in order: "x" a tensor of the main shape, "n" a
    vector of its last dimension, "m" (last only) the additive causal mask [1, 1, L, L] of a [..., L, L]
    main shape. `shape`: the benchmark size. `what`: the description without the size."""

    name: str
    fn: Callable
    what: str
    operands: str
    shape: tuple

    def mask_shape(self, shape: Optional[tuple] = None) -> Optional[tuple]:
        """The mask's shape at main shape `shape` (default: the benchmark's), None without a mask."""
        L = (shape or self.shape)[-1]
        return (1, 1, L, L) if "m" in self.operands else None

    def data_shapes(self, shape: Optional[tuple] = None) -> list[tuple]:
        """The shapes of the random inputs (every input but the mask) at main shape `shape`."""
        shape = tuple(shape or self.shape)
        return [shape if op == "x" else (shape[-1],) for op in self.operands if op != "m"]

    def input_shapes(self, shape: Optional[tuple] = None) -> list[tuple]:
        """Every input's shape, the mask's included (last)."""
        mask = self.mask_shape(shape)
        return self.data_shapes(shape) + ([mask] if mask else [])

    def inputs(self, shape: Optional[tuple] = None, generator: Optional[torch.Generator] = None) -> tuple:
        """The inputs at main shape `shape`: random_inputs from `generator` (default: seed 0)."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        return random_inputs(self.data_shapes(shape), g, self.mask_shape(shape))

    def describe(self, shape: Optional[tuple] = None) -> str:
        """"<what>, 8192x1024"; with a mask "<what>, s 8x12x256x256, mask 1x1x256x256"."""
        shape = tuple(shape or self.shape)
        mask = self.mask_shape(shape)
        return f"{self.what}, s {dims(shape)}, mask {dims(mask)}" if mask else f"{self.what}, {dims(shape)}"


#: the micro cases by name, in the benchmark's order (names: bench/run.py --only, BENCHMARKS.md)
MICRO: dict[str, Micro] = {c.name: c for c in (
    Micro("softmax", softmax_hand, "hand-written stable softmax", "x", (4096, 4096)),
    Micro("softmax_values", softmax_values, "hand-written softmax, max(-1).values", "x", (4096, 4096)),
    Micro("rmsnorm", rmsnorm_llama, "LLaMA RMSNorm x*rsqrt(mean(x^2)+eps)*w", "xn", (8192, 1024)),
    Micro("layernorm", layernorm_F, "F.layer_norm", "xnn", (8192, 1024)),
    Micro("layernorm_hand", layernorm_hand, "hand-written layer norm (mean/var/sqrt)", "xnn", (8192, 1024)),
    Micro("gelu_bias_res", gelu_bias_residual, "F.gelu(x + b) + r", "xnx", (8192, 1024)),
    Micro("swiglu", swiglu, "F.silu(g) * a", "xx", (8192, 2816)),
    Micro("attn_softmax", attn_softmax, "softmax(s*0.125 + mask, -1)", "xm", (8, 12, 256, 256)),
)}
