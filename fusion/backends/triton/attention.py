"""Fused attention in Triton (flash-attention style forward): `torch.ops.fusion.attention` on CUDA.

    triton_attention(q, k, v, mask, scale, causal) -> Tensor        q: [..., H, S, D], k/v: [..., Hkv, L, D(v)]

One program per (BLOCK_M query rows, batch*head): the query block stays in registers, key/value blocks
stream through; scores are scaled, masked (causal j <= i aligned top-left as in SDPA; a boolean mask
keeps True, a float mask is added; the mask broadcasts over batch/heads/rows through stride-0 dims),
and folded into an online softmax (running max m, running sum l, rescaled accumulator), so the S x L
score matrix never reaches memory. Grouped-query attention: query head h reads k/v head h // (H // Hkv).
Accumulation in fp32; fp32 inputs use IEEE fp32 dots (not TF32) so results match eager to ~1e-5.
Rows whose keys are all masked produce NaN, like eager SDPA's math path.

`register_cuda_impl()` makes `torch.ops.fusion.attention` run this kernel for CUDA tensors (called on
import when triton is importable).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusion.backends.triton.runtime import next_pow2


@triton.jit
def _attn_fwd(Q, K, V, M, O,
              sqb, sqh, sqs, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
              smb, smh, sms, sml, sob, soh, sos, sod,
              H, S, L, D, DV, GROUP, scale,
              HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr, CAUSAL: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < S) & (offs_d[None, :] < D), other=0.0)
    kb = K + b * skb + hk * skh
    vb = V + b * svb + hk * svh
    mb = M + b * smb + h * smh
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    hi = L
    if CAUSAL:
        hi = tl.minimum(L, (pid_m + 1) * BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + offs_n0
        k = tl.load(kb + offs_n[None, :] * skl + offs_d[:, None] * skd,
                    mask=(offs_n[None, :] < L) & (offs_d[:, None] < D), other=0.0)
        s = tl.dot(q, k, input_precision=PRECISION) * scale
        keep = (offs_n[None, :] < L) & (offs_m[:, None] >= 0)
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        if HAS_MASK:
            mm = (offs_m[:, None] < S) & (offs_n[None, :] < L)
            mv = tl.load(mb + offs_m[:, None] * sms + offs_n[None, :] * sml, mask=mm, other=0)
            if BOOL_MASK:
                keep = keep & (mv != 0)
            else:
                s = s + mv.to(tl.float32)
        s = tl.where(keep, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(vb + offs_n[:, None] * svl + offs_dv[None, :] * svd,
                    mask=(offs_n[:, None] < L) & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_dv[None, :] * sod,
             out.to(O.dtype.element_ty), mask=(offs_m[:, None] < S) & (offs_dv[None, :] < DV))


def _as4(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 4:
        return t
    if t.dim() == 3:
        return t.unsqueeze(0)
    return t.reshape(-1, *t.shape[-3:])


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float | None = None, causal: bool = False, block_m: int | None = None,
                     block_n: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask [causal]) v, as torch.ops.fusion.attention; output in q's dtype."""
    if q.dim() < 3:
        raise ValueError(f"attention expects q of rank >= 3, got {tuple(q.shape)}")
    lead = q.shape[:-3]
    H, S, D = q.shape[-3:]
    Hkv, L, DV = k.shape[-3], k.shape[-2], v.shape[-1]
    if H % Hkv:
        raise ValueError(f"query heads {H} not a multiple of key/value heads {Hkv}")
    scale = float(D ** -0.5 if scale is None else scale)
    q4 = _as4(q)
    k4 = _as4(k.expand(*lead, Hkv, L, D))
    v4 = _as4(v.expand(*lead, Hkv, L, DV))
    B = q4.shape[0]
    out = torch.empty((B, H, S, DV), dtype=q.dtype, device=q.device)
    if mask is not None:
        m = mask
        if m.dtype == torch.uint8:
            m = m.bool()
        while m.dim() < q.dim():
            m = m.unsqueeze(0)
        m = m.expand(*lead, H, S, L)
        m4 = _as4(m)                            # rank > 4: the reshape may copy the mask
        ms = m4.stride()
    else:
        m4, ms = q4, (0, 0, 0, 0)
    small = S * L <= 4096
    BM = block_m or (16 if small else 128)
    BN = block_n or (16 if small else 64)
    BD, BDV = max(16, next_pow2(D)), max(16, next_pow2(DV))
    warps = 4 if BM <= 64 else 8
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(S, BM), B * H)
    _attn_fwd[grid](q4, k4, v4, m4, out, *q4.stride(), *k4.stride(), *v4.stride(), *ms, *out.stride(),
                    H, S, L, D, DV, H // Hkv, scale,
                    HAS_MASK=mask is not None, BOOL_MASK=mask is not None and m4.dtype == torch.bool,
                    CAUSAL=bool(causal), BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, BLOCK_DV=BDV,
                    PRECISION=precision, num_warps=warps, num_stages=1 if small else 3)
    return out.reshape(*lead, H, S, DV)


_REGISTERED = False


def register_cuda_impl() -> None:
    """Run torch.ops.fusion.attention with the Triton kernel for CUDA tensors (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import fusion.dialect.ops  # noqa: F401

    def _cuda_attention(q, k, v, mask, scale, causal):
        return triton_attention(q, k, v, mask, scale, causal)

    torch.library.register_kernel("fusion::attention", "cuda", _cuda_attention)
    _REGISTERED = True


try:
    register_cuda_impl()
except Exception as _e:  # noqa: BLE001 - the eager (SDPA) implementation stays in place
    import warnings

    warnings.warn(f"fusion: Triton attention not registered for CUDA: {_e}")
