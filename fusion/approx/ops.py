"""Approximate ops (``torch.ops.fusion.*``) that `fusion.approx` puts into graphs.

Every op runs eagerly through existing fast torch kernels, so an approximated graph is executable before
(and without) lowering; a code generator may replace them with fused kernels of the same semantics.

    fusion.quantize_weight_int8(w, kn) -> (w_q int8, w_scale fp32[N])
        symmetric per-output-channel int8 weight quantization (scale = max|w_row| / 127).
        kn=False: w is [N, K] (nn.Linear layout); kn=True: w is [K, N] (HF Conv1D layout); w_q keeps w's layout.
    fusion.quantize_rows(x) -> (q int8 [M, K], s fp32 [M])
        dynamic per-token (row) symmetric int8 of the activations x [..., K] (M = rows), s = max|x_row| / 127.
    fusion.int8_matmul(q, s, w_q, w_scale, bias?, kn, act) -> fp32 [M, N]
        dynamic W8A8 linear on quantized rows: int8 x int8 -> int32 GEMM (`torch._int_mm`, oneDNN/VNNI on
        AVX-512 VNNI CPUs), then y = act(acc * s[:, None] * w_scale[None, :] + bias) with act "none", "gelu"
        or "gelu_tanh" (the epilogue; `fusion.approx.kernels` does it in one pass).
    fusion.int8_matmul_quant(q, s, w_q, w_scale, bias?, kn, act) -> (q2 int8 [M, N], s2 fp32 [M])
        quantize_rows(int8_matmul(...)) without the fp32 result: for a linear whose only consumer (after an
        activation) is another int8 linear (up -> GELU -> down of a transformer MLP).
    fusion.bf16_linear(x bf16 [..., K], w bf16, bias?, kn, act, out_bf16) -> fp32 (or bf16) [M, N]
        bf16 GEMM (oneDNN AVX512-BF16, fp32 accumulation, bf16 result), then act(result + bias) in fp32 in one
        pass (`fusion.approx.kernels.bf16_epilogue`), stored in bf16 when the next consumer is a bf16 GEMM.
    fusion.int8_weight_only_linear(x, w_q, w_scale, bias?, kn) -> [..., N]
        weight-only int8: small row counts (decode) use `aten._weight_int8pack_mm` (int8 weights streamed,
        fp32 math); larger ones dequantize the weight to x's dtype once per call and run the fp32 GEMM
        (oneDNN's where available: speed of fp32, 4x smaller weights).
    fusion.relu_attention(q, k, v, mask?, scale, causal) -> [..., H, S, Dv]
        fusion.attention with softmax replaced by relu(s) / L (L = key length; Wortsman et al. 2023):
        relu(q k^T * scale + mask) / L @ v, masked and (causal) future positions contribute 0;
        grouped-query aware like fusion.attention.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusion.approx import kernels

#: at or below this many rows the weight-only op uses `_weight_int8pack_mm` (GEMV-like); its time grows
#: linearly with the rows (measured 0.3 ms at 1 x 384 x 1536, 1.6 ms at 8, 6.2 ms at 32; dequantize + GEMM 1.2 ms)
WEIGHT_ONLY_PACK_MAX_ROWS = 4


#: weights are quantized in row blocks of about this many bytes, so converting one layer needs one int8
#: copy of it plus a few small fp32 temporaries (not 2-3 fp32 copies of the layer)
_BLOCK_BYTES = 4 << 20


def _quantize_weight(w: Tensor, kn: bool) -> tuple[Tensor, Tensor]:
    """(int8 weight in w's layout, fp32 per-output-channel scales); symmetric, scale = max|w| / 127."""
    w = w.detach()
    if not kn and w.dtype == torch.float32 and w.dim() == 2 and w.shape[0] and w.stride(1) == 1 and kernels.available():
        return kernels.quant_rows(w)   # rows = output channels: one pass, no temporaries
    rows = max(1, _BLOCK_BYTES // max(1, w.shape[1] * 4))
    if kn:   # [K, N], channels are columns: running max over row blocks
        amax = torch.zeros(w.shape[1], dtype=torch.float32)
        for i in range(0, w.shape[0], rows):
            torch.maximum(amax, w[i:i + rows].abs().amax(0).float(), out=amax)
    else:
        amax = torch.cat([w[i:i + rows].abs().amax(1).float() for i in range(0, w.shape[0], rows)]) \
            if w.shape[0] else torch.zeros(0)
    scale = amax.clamp_min(1e-12) / 127.0
    inv = 1.0 / scale
    q = torch.empty(w.shape, dtype=torch.int8)
    for i in range(0, w.shape[0], rows):
        blk_inv = inv if kn else inv[i:i + rows].unsqueeze(1)
        q[i:i + rows] = torch.round(w[i:i + rows].float() * blk_inv).clamp_(-127, 127)
    return q, scale


@torch.library.custom_op("fusion::quantize_weight_int8", mutates_args=())
def quantize_weight_int8(w: Tensor, kn: bool) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8 quantization of a weight; see the module docstring."""
    return _quantize_weight(w, kn)


@quantize_weight_int8.register_fake
def _(w: Tensor, kn: bool) -> tuple[Tensor, Tensor]:
    n = w.shape[1] if kn else w.shape[0]
    return torch.empty_like(w, dtype=torch.int8, memory_format=torch.contiguous_format), w.new_empty((n,), dtype=torch.float32)


def _quantize_rows(x2: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row (per-token) symmetric int8: returns (q [M, K] int8, scale [M, 1] fp32)."""
    mn, mx = torch.aminmax(x2, dim=1, keepdim=True)
    scale = torch.maximum(mx, mn.neg()).clamp_min_(1e-12).div_(127.0)
    q = torch.round(x2 * scale.reciprocal()).to(torch.int8)   # |x/scale| <= 127: no clamp needed
    return q, scale


def _check_weight(w_q: Tensor, op: str) -> None:
    if w_q.dtype != torch.int8:
        raise TypeError(
            f"fusion.{op} expects the int8 weight its placeholder was converted to in place, got {w_q.dtype}; "
            "pass the same weight tensors the approximation pass converted (bind weights by name)"
        )


def _rows(x: Tensor) -> Tensor:
    """x [..., K] as fp32 [M, K] rows with unit inner stride (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != torch.float32:
        x2 = x2.float()
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] <= 1 else x2.contiguous()


def _quantize_rows_op(x: Tensor) -> tuple[Tensor, Tensor]:
    x2 = _rows(x)
    if x2.shape[0] and kernels.available():
        return kernels.quant_rows(x2)
    if not x2.shape[0]:
        return torch.empty(x2.shape, dtype=torch.int8), torch.empty(0)
    q, s = _quantize_rows(x2)
    return q, s.view(-1)


@torch.library.custom_op("fusion::quantize_rows", mutates_args=())
def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token symmetric int8 of activations: (q [M, K] int8, s [M] fp32); see the module docstring."""
    return _quantize_rows_op(x)


@quantize_rows.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty((m, x.shape[-1]), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32)


def _act(y: Tensor, act: str) -> Tensor:
    if act == "none":
        return y
    return torch.nn.functional.gelu(y, approximate="tanh" if act == "gelu_tanh" else "none")


def _int8_product(q: Tensor, w_q: Tensor, kn: bool, op: str) -> Tensor:
    _check_weight(w_q, op)
    return torch._int_mm(q, w_q if kn else w_q.t())          # int32 [M, N]: oneDNN, AVX-512 VNNI


def _epilogue_inputs(w_scale: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    return w_scale.float().contiguous(), None if bias is None else bias.float().contiguous()


def _int8_matmul(q: Tensor, s: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor], kn: bool,
                 act: str) -> Tensor:
    n = w_q.shape[1] if kn else w_q.shape[0]
    if q.shape[0] == 0:
        return q.new_zeros((0, n), dtype=torch.float32)
    acc = _int8_product(q, w_q, kn, "int8_matmul")
    ws, b = _epilogue_inputs(w_scale, bias)
    if kernels.available():
        return kernels.dequant(acc, s.contiguous(), ws, b, act)
    y = torch.mul(acc, s.unsqueeze(1))                       # fp32 [M, N]
    y = torch.addcmul(b, y, ws) if b is not None else y.mul_(ws)
    return _act(y, act)


@torch.library.custom_op("fusion::int8_matmul", mutates_args=())
def int8_matmul(q: Tensor, s: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor], kn: bool,
                act: str) -> Tensor:
    """Dynamic W8A8 linear on per-token quantized rows, fused dequantization epilogue; see the module docstring."""
    return _int8_matmul(q, s, w_q, w_scale, bias, kn, act)


@int8_matmul.register_fake
def _(q: Tensor, s: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor], kn: bool, act: str) -> Tensor:
    return q.new_empty((q.shape[0], w_q.shape[1] if kn else w_q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fusion::int8_matmul_quant", mutates_args=())
def int8_matmul_quant(q: Tensor, s: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor], kn: bool,
                      act: str) -> tuple[Tensor, Tensor]:
    """quantize_rows(int8_matmul(...)) in one epilogue pass (the fp32 rows never reach memory)."""
    if q.shape[0] and kernels.available():
        ws, b = _epilogue_inputs(w_scale, bias)
        return kernels.dequant_quant(_int8_product(q, w_q, kn, "int8_matmul_quant"), s.contiguous(), ws, b, act)
    return _quantize_rows_op(_int8_matmul(q, s, w_q, w_scale, bias, kn, act))


@int8_matmul_quant.register_fake
def _(q: Tensor, s: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor], kn: bool,
      act: str) -> tuple[Tensor, Tensor]:
    n = w_q.shape[1] if kn else w_q.shape[0]
    return q.new_empty((q.shape[0], n), dtype=torch.int8), q.new_empty((q.shape[0],), dtype=torch.float32)


def _bf16_linear(x: Tensor, w: Tensor, bias: Optional[Tensor], kn: bool, act: str, out_bf16: bool) -> Tensor:
    if w.dtype != torch.bfloat16:
        raise TypeError(f"fusion.bf16_linear expects the bf16 weight its placeholder was converted to in place, got "
                        f"{w.dtype}; pass the same weight tensors the approximation pass converted (bind weights by name)")
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    y = torch.mm(x2, w if kn else w.t())                    # bf16 GEMM (oneDNN), fp32 accumulation inside
    b = None if bias is None else bias.float().contiguous()
    out_dtype = torch.bfloat16 if out_bf16 else torch.float32
    if b is None and act == "none" and out_bf16:            # the GEMM result itself (no epilogue pass)
        return y
    if kernels.available() and y.shape[0]:
        return kernels.bf16_epilogue(y.contiguous(), b, None if act == "none" else act, out_dtype)
    y = y.float() if b is None else y.float() + b
    return _act(y, act).to(out_dtype)


@torch.library.custom_op("fusion::bf16_linear", mutates_args=())
def bf16_linear(x: Tensor, w: Tensor, bias: Optional[Tensor], kn: bool, act: str, out_bf16: bool) -> Tensor:
    """bf16 linear: bf16 GEMM, fp32 bias + activation epilogue; see the module docstring."""
    return _bf16_linear(x, w, bias, kn, act, out_bf16)


@bf16_linear.register_fake
def _(x: Tensor, w: Tensor, bias: Optional[Tensor], kn: bool, act: str, out_bf16: bool) -> Tensor:
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty((m, w.shape[1] if kn else w.shape[0]), dtype=torch.bfloat16 if out_bf16 else torch.float32)


def _dequantize(w_q: Tensor, w_scale: Tensor, kn: bool, dtype: torch.dtype) -> Tensor:
    """The [N, K] weight in `dtype` (a fresh tensor, freed after the call)."""
    if kn:
        return (w_q.to(dtype) * w_scale.to(dtype)).t()
    return w_q.to(dtype) * w_scale.to(dtype).unsqueeze(1)


def _int8_weight_only_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor], kn: bool) -> Tensor:
    _check_weight(w_q, "int8_weight_only_linear")
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] <= WEIGHT_ONLY_PACK_MAX_ROWS and not kn and x2.dtype in (torch.float32, torch.bfloat16):
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), w_q, w_scale.to(x2.dtype))
        if bias is not None:
            y = y + bias.to(y.dtype)
    else:
        w = _dequantize(w_q, w_scale, kn, x2.dtype)
        b = None if bias is None else bias.to(x2.dtype)
        linear = _onednn_linear() if x2.dtype == torch.float32 else None
        # oneDNN's fp32 GEMM where there is one (on AMD CPUs ~2x MKL's AVX2 path, see fusion/passes/gemm.py)
        y = linear(x2, w.contiguous(), b, "none", [], "") if linear is not None else torch.nn.functional.linear(x2, w, b)
    return y.view(*x.shape[:-1], y.shape[-1])


def _onednn_linear():
    from fusion.passes.gemm import onednn_linear

    return onednn_linear()


@torch.library.custom_op("fusion::int8_weight_only_linear", mutates_args=())
def int8_weight_only_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor], kn: bool) -> Tensor:
    """Weight-only int8 linear (fp32 activations and math); see the module docstring."""
    return _int8_weight_only_linear(x, w_q, w_scale, bias, kn)


@int8_weight_only_linear.register_fake
def _(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor], kn: bool) -> Tensor:
    n = w_q.shape[1] if kn else w_q.shape[0]
    return x.new_empty((*x.shape[:-1], n))


#: ops this package adds, with a short name for reports (like fusion.dialect.ops.FUSED_OPS)
APPROX_OPS: dict[object, str] = {
    torch.ops.fusion.quantize_weight_int8.default: "quantize_weight_int8",
    torch.ops.fusion.quantize_rows.default: "quantize_rows",
    torch.ops.fusion.int8_matmul.default: "int8_matmul",
    torch.ops.fusion.int8_matmul_quant.default: "int8_matmul_quant",
    torch.ops.fusion.bf16_linear.default: "bf16_linear",
    torch.ops.fusion.int8_weight_only_linear.default: "int8_weight_only_linear",
}


@torch.library.custom_op("fusion::relu_attention", mutates_args=())
def relu_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, causal: bool) -> Tensor:
    """relu(q @ k^T * scale + mask) / L @ v, L = k.shape[-2]; the arguments of fusion.attention."""
    if k.shape[-3] != q.shape[-3]:                       # grouped-query: each k/v head serves H/Hkv q heads
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    S, L = q.shape[-2], k.shape[-2]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    if causal:
        s = s.masked_fill(~torch.ones(S, L, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return _sdpa_layout(torch.matmul(torch.relu(s) / L, v))


def _sdpa_layout(out: Tensor) -> Tensor:
    """[B, H, S, D] stored as [B, S, H, D], as SDPA's CPU kernel returns it (captured graphs may `view`
    the transposed result, which only that layout allows)."""
    if out.dim() != 4:
        return out
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@relu_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, causal: bool) -> Tensor:
    return _sdpa_layout(q.new_empty((*q.shape[:-1], v.shape[-1])))
