"""Hand-written C++ kernels around the int8 and bf16 GEMMs of `fusion.approx.ops`.

ATen has the int8 GEMM (``torch._int_mm``: oneDNN, AVX-512 VNNI) but no fused per-token quantization or
dequantization: done with ATen ops, quantizing the activations takes 4-5 passes over them (abs-max, divide,
round, cast) and dequantizing 2-3 passes over the int32 product, which costs more than the int8 GEMM
saves. These kernels do each in ONE pass (a row is read once into L1 and reused):

    quant_rows(x fp32 [M, K] (row stride ldx)) -> q int8 [M, K], s fp32 [M]
        s[m] = max_k |x[m, k]| / 127;  q[m, k] = round_half_even(x[m, k] / s[m])      (symmetric, per token)
    dequant(acc int32 [M, N], xs [M], ws [N], bias [N]?, act) -> y fp32 [M, N]
        y[m, n] = act(acc[m, n] * xs[m] * ws[n] + bias[n]);  act: none | gelu (erf) | gelu (tanh)
    dequant_quant(acc, xs, ws, bias?, act) -> q2 int8 [M, N], s2 fp32 [M]
        dequant then quant_rows of its result, the fp32 row never leaving L1: the epilogue of a linear whose
        only consumer (after `act`) is another int8 linear (transformer MLP: up -> GELU -> down).
    bf16_epilogue(y bf16 [M, N], bias [N]?, act, out_dtype) -> fp32 or bf16 [M, N]
        act(float(y) + bias) of a bf16 GEMM's output (the bf16 linear: bias and activation in fp32, one pass;
        bf16 out when the next consumer is another bf16 GEMM).

Compiled once per machine with the project's kernel cache (`fusion.backends.cpp.compiler`: g++ -O3 -march=native,
OpenMP); `available()` is False when no compiler works, and `fusion.approx.ops` then uses ATen ops.
"""
from __future__ import annotations

import ctypes
import threading
from typing import Optional

import torch
from torch import Tensor

ACTS = {None: 0, "none": 0, "gelu": 1, "gelu_tanh": 2}

SOURCE = r"""
#include <cstdint>
#include <cmath>
#include <algorithm>
#include <omp.h>
extern "C" float erff(float) __attribute__((simd("notinbranch")));
extern "C" float tanhf(float) __attribute__((simd("notinbranch")));
#define PAR_MIN 32768

static inline void quant_row(const float* __restrict xr, int64_t K, int8_t* __restrict qr, float* s) {
  float amax = 0.f;
  #pragma omp simd reduction(max:amax)
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(xr[k]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  #pragma omp simd
  for (int64_t k = 0; k < K; ++k) qr[k] = (int8_t)std::nearbyint(xr[k] * inv);
  *s = amax > 0.f ? amax / 127.f : 1.f;
}

static inline void deq_row(const int32_t* __restrict a, int64_t N, float xs, const float* __restrict ws,
                           const float* __restrict bias, int act, float* __restrict y) {
  if (bias) {
    #pragma omp simd
    for (int64_t n = 0; n < N; ++n) y[n] = (float)a[n] * xs * ws[n] + bias[n];
  } else {
    #pragma omp simd
    for (int64_t n = 0; n < N; ++n) y[n] = (float)a[n] * xs * ws[n];
  }
  if (act == 1) {
    #pragma omp simd
    for (int64_t n = 0; n < N; ++n) { float v = y[n]; y[n] = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }
  } else if (act == 2) {
    #pragma omp simd
    for (int64_t n = 0; n < N; ++n) {
      float v = y[n]; y[n] = 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    }
  }
}

static inline float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; __builtin_memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {   // round to nearest even, as torch does
  uint32_t u; __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

extern "C" {
void bf16_epilogue(int64_t nthreads, const uint16_t* y, int64_t M, int64_t N, const float* bias, int64_t act,
                   int64_t out_bf16, void* out) {
  #pragma omp parallel num_threads(nthreads) if(nthreads > 1 && M * N >= PAR_MIN)
  {
    float* row = new float[N];
    #pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      const uint16_t* __restrict yr = y + m * N;
      float* __restrict r = out_bf16 ? row : (float*)out + m * N;
      if (bias) {
        #pragma omp simd
        for (int64_t n = 0; n < N; ++n) r[n] = bf2f(yr[n]) + bias[n];
      } else {
        #pragma omp simd
        for (int64_t n = 0; n < N; ++n) r[n] = bf2f(yr[n]);
      }
      if (act == 1) {
        #pragma omp simd
        for (int64_t n = 0; n < N; ++n) { float v = r[n]; r[n] = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }
      } else if (act == 2) {
        #pragma omp simd
        for (int64_t n = 0; n < N; ++n) {
          float v = r[n]; r[n] = 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
        }
      }
      if (out_bf16) {
        uint16_t* __restrict o = (uint16_t*)out + m * N;
        #pragma omp simd
        for (int64_t n = 0; n < N; ++n) o[n] = f2bf(r[n]);
      }
    }
    delete[] row;
  }
}

void quant_rows(int64_t nthreads, const float* x, int64_t M, int64_t K, int64_t ldx, int8_t* q, float* s) {
  #pragma omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1 && M * K >= PAR_MIN)
  for (int64_t m = 0; m < M; ++m) quant_row(x + m * ldx, K, q + m * K, s + m);
}

void dequant(int64_t nthreads, const int32_t* acc, int64_t M, int64_t N, const float* xs, const float* ws,
             const float* bias, int64_t act, float* y) {
  #pragma omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1 && M * N >= PAR_MIN)
  for (int64_t m = 0; m < M; ++m) deq_row(acc + m * N, N, xs[m], ws, bias, (int)act, y + m * N);
}

void dequant_quant(int64_t nthreads, const int32_t* acc, int64_t M, int64_t N, const float* xs, const float* ws,
                   const float* bias, int64_t act, int8_t* q, float* s) {
  #pragma omp parallel num_threads(nthreads) if(nthreads > 1 && M * N >= PAR_MIN)
  {
    float* row = new float[N];
    #pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      deq_row(acc + m * N, N, xs[m], ws, bias, (int)act, row);
      quant_row(row, N, q + m * N, s + m);
    }
    delete[] row;
  }
}
}
"""

_lock = threading.Lock()
#: resolved compiler -> the library it built, or the reason it could not (then the ATen path is used)
_libs: dict[str, ctypes.CDLL] = {}
_failed: dict[str, str] = {}


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """`lib` with the argument and result types of its four kernels set."""
    P, I = ctypes.c_void_p, ctypes.c_int64
    lib.quant_rows.argtypes = [I, P, I, I, I, P, P]
    lib.dequant.argtypes = [I, P, I, I, P, P, P, I, P]
    lib.dequant_quant.argtypes = [I, P, I, I, P, P, P, I, P, P]
    lib.bf16_epilogue.argtypes = [I, P, I, I, P, I, I, P]
    for f in (lib.quant_rows, lib.dequant, lib.dequant_quant, lib.bf16_epilogue):
        f.restype = None
    return lib


def library(cxx: Optional[str] = None) -> Optional[ctypes.CDLL]:
    """The compiled kernels, built by `cxx` (Config.cxx; None = $FUSION_CXX or g++) on first use, then loaded
    from the disk cache; None without a working compiler. The run-time ops (fusion.approx.ops) carry no
    Config and call it with None."""
    from fusion.config import resolve_cxx

    cxx = resolve_cxx(cxx)
    if cxx in _libs or cxx in _failed:
        return _libs.get(cxx)
    with _lock:
        if cxx not in _libs and cxx not in _failed:
            try:
                from fusion.backends.cpp import compiler as kernel_cache

                _libs[cxx] = _bind(kernel_cache.load(kernel_cache.build(SOURCE, cxx=cxx)[1]))
            except Exception as e:  # noqa: BLE001 - no compiler: the ATen path is used
                _failed[cxx] = f"{type(e).__name__}: {e}"
    return _libs.get(cxx)


def available(cxx: Optional[str] = None) -> bool:
    return library(cxx) is not None


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def quant_rows(x2: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8 of a 2-D fp32 tensor with unit inner stride: (q [M, K] int8, s [M] fp32)."""
    M, K = x2.shape
    assert x2.dtype == torch.float32 and (x2.stride(1) == 1 or K <= 1)
    q = torch.empty((M, K), dtype=torch.int8)
    s = torch.empty((M,), dtype=torch.float32)
    library().quant_rows(torch.get_num_threads(), x2.data_ptr(), M, K, x2.stride(0) if M > 1 else K,
                         q.data_ptr(), s.data_ptr())
    return q, s


def _epilogue_args(acc: Tensor, xs: Tensor, ws: Tensor, bias: Optional[Tensor]) -> tuple:
    assert acc.dtype == torch.int32 and acc.is_contiguous() and xs.is_contiguous() and ws.is_contiguous()
    assert bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())
    return acc.data_ptr(), acc.shape[0], acc.shape[1], xs.data_ptr(), ws.data_ptr(), _ptr(bias)


def dequant(acc: Tensor, xs: Tensor, ws: Tensor, bias: Optional[Tensor], act: Optional[str] = None) -> Tensor:
    """fp32 act(acc * xs[:, None] * ws[None, :] + bias) of an int32 [M, N] product, in one pass."""
    y = torch.empty(acc.shape, dtype=torch.float32)
    library().dequant(torch.get_num_threads(), *_epilogue_args(acc, xs, ws, bias), ACTS[act], y.data_ptr())
    return y


def dequant_quant(acc: Tensor, xs: Tensor, ws: Tensor, bias: Optional[Tensor], act: Optional[str] = None
                  ) -> tuple[Tensor, Tensor]:
    """quant_rows(dequant(...)) without writing the fp32 rows out: (q int8 [M, N], s fp32 [M])."""
    M, N = acc.shape
    q = torch.empty((M, N), dtype=torch.int8)
    s = torch.empty((M,), dtype=torch.float32)
    library().dequant_quant(torch.get_num_threads(), *_epilogue_args(acc, xs, ws, bias), ACTS[act],
                            q.data_ptr(), s.data_ptr())
    return q, s


def bf16_epilogue(y: Tensor, bias: Optional[Tensor], act: Optional[str] = None, out_dtype: torch.dtype = torch.float32
                  ) -> Tensor:
    """act(float(y) + bias) of a bf16 [M, N] product, stored as `out_dtype` (fp32, or bf16 for a next bf16 GEMM)."""
    assert y.dtype == torch.bfloat16 and y.is_contiguous() and y.dim() == 2
    assert bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())
    assert out_dtype in (torch.float32, torch.bfloat16)
    out = torch.empty(y.shape, dtype=out_dtype)
    library().bf16_epilogue(torch.get_num_threads(), y.data_ptr(), y.shape[0], y.shape[1], _ptr(bias), ACTS[act],
                            int(out_dtype == torch.bfloat16), out.data_ptr())
    return out
