"""The fused-op vocabulary shared by the rewriter, the scheduler and the code generators.

Rewrites produce these ops; the scheduler lowers them into kernels; if a fused op is not lowered
(unsupported dtype, no compiler, an ATen-only config) it still runs, through its eager reference
below, so a rewritten graph is always executable.

Ops that ATen already has are used as they are:
    softmax(x, dim)          -> aten._softmax.default(x, dim, False)
    log_softmax(x, dim)      -> aten._log_softmax.default(x, dim, False)
    gelu(x) / gelu_tanh(x)   -> aten.gelu.default(x) / aten.gelu.default(x, approximate="tanh")
    silu(x)                  -> aten.silu.default(x)
Ops ATen lacks in a single-output functional form are defined here, in the `fusion` namespace:
    fusion.layer_norm(x, weight?, bias?, eps)  normalises over the last dim only
    fusion.rms_norm(x, weight?, eps)           x * rsqrt(mean(x*x, -1) + eps) * weight
    fusion.attention(q, k, v, mask?, scale, causal)  softmax(q k^T * scale + mask) v, grouped-query aware
    fusion.gelu_quick(x)                       x * sigmoid(1.702 * x)   (HF QuickGELUActivation, CLIP)
    fusion.swiglu(g, u)                        silu(g) * u              (LLaMA's MLP)
    fusion.geglu(g, u, approximate)            gelu(g, approximate) * u
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

aten = torch.ops.aten


@torch.library.custom_op("fusion::layer_norm", mutates_args=())
def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """(x - mean(x)) / sqrt(var(x) + eps) * weight + bias, over the last dim (biased variance)."""
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@layer_norm.register_fake
def _(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fusion::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """x * rsqrt(mean(x*x, -1, keepdim) + eps) [* weight], computed in x's dtype."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * weight if weight is not None else y


@rms_norm.register_fake
def _(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    if weight is None:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    shape = torch.broadcast_shapes(x.shape, weight.shape)
    return x.new_empty(shape, dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.custom_op("fusion::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, causal: bool) -> Tensor:
    """softmax(q @ k^T * scale + mask [causal]) @ v.

    q: [..., H, S, D]; k, v: [..., Hkv, L, D] with H a multiple of Hkv (grouped-query heads share k/v);
    mask: additive float or boolean (True = keep), broadcastable to [..., H, S, L]; causal: keep j <= i
    (aligned to the top-left, as in SDPA). On CPU this runs PyTorch's fused SDPA kernel.
    """
    enable_gqa = k.shape[-3] != q.shape[-3]
    if mask is not None and mask.dim() < 2:
        mask = mask.unsqueeze(0)  # SDPA's CPU kernel wants the mask at least 2-D
    if mask is not None and is_causal_mask(mask, q.shape[-2], k.shape[-2]):
        mask, causal = None, True  # the same function, and the kernel skips the masked half
    if causal and mask is not None:
        return _attention_masked_causal(q, k, v, mask, scale, enable_gqa)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=enable_gqa
    )


_TRIL: dict = {}


def is_causal_mask(mask: Tensor, S: int, L: int) -> bool:
    """True when `mask` is exactly the top-left causal mask in every leading (batch, head) slice: boolean
    tril, or additive with 0 where j <= i and below -1e30 (dtype min or -inf) where j > i. Then
    softmax(s + mask) == softmax over j <= i exactly, so SDPA's causal path computes the same function.
    Model code (HF GPT-2, LLaMA) builds this mask from aranges at run time, so it is checked here, on
    the values: three passes over an S x L mask, tiny next to the attention it lets us halve."""
    if mask.dim() < 2 or tuple(mask.shape[-2:]) != (S, L) or S == 1 or mask.numel() == 0:
        return False
    m = mask.reshape(-1, S, L)  # every leading slice (batch, heads) must be the causal mask
    key = (S, L, m.device)
    if key not in _TRIL:
        tril = torch.ones(S, L, dtype=torch.bool, device=m.device).tril()
        _TRIL[key] = (tril, ~tril)
        if len(_TRIL) > 16:
            _TRIL.pop(next(iter(_TRIL)))
    tril, above = (t.expand(m.shape[0], S, L) for t in _TRIL[key])
    if m.dtype == torch.bool:
        return torch.equal(m, tril)
    if not m.is_floating_point():
        return False
    return torch.equal(m == 0, tril) and torch.equal(m < -1e30, above)


def _attention_masked_causal(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, gqa: bool) -> Tensor:
    S, L = q.shape[-2], k.shape[-2]
    keep = torch.ones(S, L, dtype=torch.bool, device=q.device).tril()
    if mask.dtype == torch.bool:
        mask = mask & keep
    else:
        mask = mask.masked_fill(~keep, float("-inf"))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


@attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, causal: bool) -> Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("fusion::gelu_quick", mutates_args=())
def gelu_quick(x: Tensor) -> Tensor:
    """x * sigmoid(1.702 * x): the ATen ops of the source form in its order (so it rounds as eager does),
    in one buffer."""
    y = x * 1.702
    return y.sigmoid_().mul_(x)


@gelu_quick.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)     # pointwise: x's layout, as aten's pointwise ops


def _glu(act: Tensor, u: Tensor) -> Tensor:
    """act * u, into act's buffer when u does not grow it (act is a fresh temporary)."""
    return act.mul_(u) if torch.broadcast_shapes(act.shape, u.shape) == act.shape and act.dtype == u.dtype else act * u


@torch.library.custom_op("fusion::swiglu", mutates_args=())
def swiglu(g: Tensor, u: Tensor) -> Tensor:
    """silu(g) * u (the gated linear unit of LLaMA's MLP), rounded as the source form."""
    return _glu(aten.silu.default(g), u)


@swiglu.register_fake
def _(g: Tensor, u: Tensor) -> Tensor:
    return g * u        # the product's shape, dtype and layout


@torch.library.custom_op("fusion::geglu", mutates_args=())
def geglu(g: Tensor, u: Tensor, approximate: str) -> Tensor:
    """gelu(g, approximate) * u ("none": erf GELU, "tanh"), rounded as the source form."""
    return _glu(aten.gelu.default(g, approximate=approximate), u)


@geglu.register_fake
def _(g: Tensor, u: Tensor, approximate: str) -> Tensor:
    return g * u


#: FX targets that are "fused ops" (one kernel each, or part of one), with a short name for reports.
FUSED_OPS: dict[object, str] = {
    aten._softmax.default: "softmax",
    aten._log_softmax.default: "log_softmax",
    aten.gelu.default: "gelu",
    aten.silu.default: "silu",
    torch.ops.fusion.gelu_quick.default: "gelu_quick",
    torch.ops.fusion.swiglu.default: "swiglu",
    torch.ops.fusion.geglu.default: "geglu",
    torch.ops.fusion.layer_norm.default: "layer_norm",
    torch.ops.fusion.rms_norm.default: "rms_norm",
    torch.ops.fusion.attention.default: "attention",
}
