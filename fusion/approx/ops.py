"""Approximate ops (``torch.ops.fusion.*``) that `fusion.approx` puts into graphs.

Every op runs eagerly through existing fast torch kernels, so an approximated graph is executable before
(and without) lowering; a code generator may replace them with fused kernels of the same semantics.

    fusion.quantize_weight_int8(w, kn) -> (w_q int8, w_scale fp32[N])
        symmetric per-output-channel int8 weight quantization (scale = max|w_row| / 127).
        kn=False: w is [N, K] (nn.Linear layout); kn=True: w is [K, N] (HF Conv1D layout); w_q keeps w's layout.
    fusion.int8_linear(x, w_q, w_scale, bias?, kn) -> fp32 [..., N]
        dynamic W8A8: x is quantized per token (row) symmetrically to int8 on every call
        (scale = max|x_row| / 127), then int8 x int8 -> int32 GEMM (`torch._int_mm`, oneDNN/VNNI on AVX-512
        VNNI CPUs), then y = acc * x_scale[:, None] * w_scale[None, :] + bias.
    fusion.int8_linear_per_tensor(x, w_q, w_scale, bias?, kn) -> fp32 [..., N]
        dynamic W8A8 with ONE activation scale per call (asymmetric uint8, fbgemm `quantized.linear_dynamic`:
        quantization, int8 GEMM and dequantize+bias epilogue in one fused call); the fbgemm-packed weight is
        built from w_q on first use and cached per weight tensor.
    fusion.int8_weight_only_linear(x, w_q, w_scale, bias?, kn) -> [..., N]
        weight-only int8: small row counts (decode) use `aten._weight_int8pack_mm` (int8 weights streamed,
        fp32 math); larger ones dequantize the weight to x's dtype once per call and run the fp32 GEMM
        (speed of fp32, 4x smaller weights).
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Optional

import torch
from torch import Tensor

#: at or below this many rows the weight-only op uses `_weight_int8pack_mm` (GEMV-like, bandwidth bound)
WEIGHT_ONLY_PACK_MAX_ROWS = 32


#: weights are quantized in row blocks of about this many bytes, so converting one layer needs one int8
#: copy of it plus a few small fp32 temporaries (not 2-3 fp32 copies of the layer)
_BLOCK_BYTES = 4 << 20


def _quantize_weight(w: Tensor, kn: bool) -> tuple[Tensor, Tensor]:
    """(int8 weight in w's layout, fp32 per-output-channel scales); symmetric, scale = max|w| / 127."""
    w = w.detach()
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


def _int8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor], kn: bool) -> Tensor:
    _check_weight(w_q, "int8_linear")
    k = x.shape[-1]
    n = w_q.shape[1] if kn else w_q.shape[0]
    x2 = x.reshape(-1, k)
    if x2.dtype != torch.float32:
        x2 = x2.float()
    x2 = x2.contiguous()
    if x2.shape[0] == 0:
        return x.new_zeros((*x.shape[:-1], n), dtype=torch.float32)
    q, xs = _quantize_rows(x2)
    acc = torch._int_mm(q, w_q if kn else w_q.t())          # int32 [M, N]
    y = torch.mul(acc, xs)                                   # fp32 [M, N] (one pass)
    if bias is not None:
        y = torch.addcmul(bias.float(), y, w_scale, out=y) if y.is_contiguous() else bias + y * w_scale
    else:
        y.mul_(w_scale)
    return y.view(*x.shape[:-1], n)


@torch.library.custom_op("fusion::int8_linear", mutates_args=())
def int8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor], kn: bool) -> Tensor:
    """Dynamic W8A8 linear (per-token activation scales, per-channel weight scales); see the module docstring."""
    return _int8_linear(x, w_q, w_scale, bias, kn)


@int8_linear.register_fake
def _(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor], kn: bool) -> Tensor:
    n = w_q.shape[1] if kn else w_q.shape[0]
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


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
        y = torch.nn.functional.linear(x2, w, None if bias is None else bias.to(x2.dtype))
    return y.view(*x.shape[:-1], y.shape[-1])


@torch.library.custom_op("fusion::int8_weight_only_linear", mutates_args=())
def int8_weight_only_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor], kn: bool) -> Tensor:
    """Weight-only int8 linear (fp32 activations and math); see the module docstring."""
    return _int8_weight_only_linear(x, w_q, w_scale, bias, kn)


@int8_weight_only_linear.register_fake
def _(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor], kn: bool) -> Tensor:
    n = w_q.shape[1] if kn else w_q.shape[0]
    return x.new_empty((*x.shape[:-1], n))


# ----------------------------------------------------------------------------------------------
# per-tensor dynamic W8A8 through fbgemm (one fused C++ call: activation range + quantization, int8 GEMM,
# dequantization + bias epilogue). Measured fastest on this CPU; less accurate than per-token scales.

_PACKED: dict[int, tuple[Any, tuple, Any]] = {}   # id(weight) -> (weakref, versions, packed)


def _packed(w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor], kn: bool) -> Any:
    """fbgemm-packed weight for the live int8 weight `w_q`, built on first use and cached per tensor object
    (dropped when the tensor dies; rebuilt if it is modified in place). The packed copy is int8 too."""
    key = id(w_q)
    hit = _PACKED.get(key)
    version = (w_q._version, w_scale._version, None if bias is None else bias._version)
    if hit is not None and hit[0]() is w_q and hit[1] == version:
        return hit[2]
    wn = w_q.t().contiguous() if kn else w_q.contiguous()
    with warnings.catch_warnings():   # quantized tensors are deprecated in torch (still the fbgemm entry point)
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(wn, w_scale.double(), torch.zeros(wn.shape[0], dtype=torch.long), 0)
        packed = torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.detach().float().contiguous())
    del qw, wn
    _PACKED[key] = (weakref.ref(w_q, lambda _r, k=key: _PACKED.pop(k, None)), version, packed)
    return packed


def _int8_linear_per_tensor(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor], kn: bool) -> Tensor:
    _check_weight(w_q, "int8_linear_per_tensor")
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
    y = torch.ops.quantized.linear_dynamic(x2, _packed(w_q, w_scale, bias, kn), False)
    return y.view(*x.shape[:-1], y.shape[-1])


@torch.library.custom_op("fusion::int8_linear_per_tensor", mutates_args=())
def int8_linear_per_tensor(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor], kn: bool) -> Tensor:
    """Dynamic W8A8 linear, ONE activation scale per call (fbgemm `quantized.linear_dynamic`), per-channel weights."""
    return _int8_linear_per_tensor(x, w_q, w_scale, bias, kn)


@int8_linear_per_tensor.register_fake
def _(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor], kn: bool) -> Tensor:
    n = w_q.shape[1] if kn else w_q.shape[0]
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


#: ops this package adds, with a short name for reports (like fusion.ops.FUSED_OPS)
APPROX_OPS: dict[object, str] = {
    torch.ops.fusion.quantize_weight_int8.default: "quantize_weight_int8",
    torch.ops.fusion.int8_linear.default: "int8_linear",
    torch.ops.fusion.int8_linear_per_tensor.default: "int8_linear_per_tensor",
    torch.ops.fusion.int8_weight_only_linear.default: "int8_weight_only_linear",
}
