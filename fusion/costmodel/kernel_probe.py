"""What GENERATED kernels reach on this machine: a small C++ probe compiled with the flags of
fusion.backends.cpp.compiler (g++ -O3 -march=native -fopenmp, glibc's vector expf/erff/tanhf) and called through
ctypes. Used by fusion.costmodel.calibrate; the measuring functions (best-of-N, slope) are passed in.
"""
from __future__ import annotations

import ctypes
import os
import tempfile
from pathlib import Path

import torch

from fusion.config import resolve_cxx

_PROBE = r"""
#include <math.h>
#include <stdint.h>
#include <omp.h>
extern "C" float expf(float) __attribute__((simd("notinbranch")));
extern "C" float tanhf(float) __attribute__((simd("notinbranch")));
extern "C" float erff(float) __attribute__((simd("notinbranch")));
#define LOOP(NAME, EXPR) \
extern "C" void NAME(int64_t nt, int64_t n, const float* __restrict x, float* __restrict y) { \
  _Pragma("omp parallel for simd num_threads(nt) schedule(static)") \
  for (int64_t i = 0; i < n; i++) { float v = x[i]; y[i] = EXPR; } }
LOOP(p_exp, expf(v))
LOOP(p_erf, erff(v))
LOOP(p_tanh, tanhf(v))
LOOP(p_scale, v * 1.5f)
/* two independent chains of 7 FMAs in registers + 1 multiply: 29 FLOPs per element, 8 bytes moved */
extern "C" void p_fma(int64_t nt, int64_t n, const float* __restrict x, float* __restrict y) {
  #pragma omp parallel for simd num_threads(nt) schedule(static)
  for (int64_t i = 0; i < n; i++) {
    float a = x[i], b = x[i];
    a = a * 1.0001f + 0.5f; b = b * 1.0004f + 0.5f;
    a = a * 0.9999f + 0.25f; b = b * 0.9996f + 0.25f;
    a = a * 1.0002f + 0.125f; b = b * 1.0005f + 0.125f;
    a = a * 0.9998f + 0.0625f; b = b * 0.9995f + 0.0625f;
    a = a * 1.0003f + 0.03f; b = b * 1.0006f + 0.03f;
    a = a * 0.9997f + 0.01f; b = b * 0.9994f + 0.01f;
    a = a * 1.0007f + 0.02f; b = b * 0.9993f + 0.02f;
    y[i] = a * b;
  }
}
"""
_PROBE_FLOPS = 29          # 2 chains x 7 FMAs (14 FLOPs each) + 1 multiply


def kernel_rates(n: int, reps: int, dram_elems: int = 64 << 20, *, best, slope,
                 cxx: str | None = None) -> dict[str, float]:
    """What GENERATED kernels reach (fusion.backends.cpp.render: g++ -O3 -march=native -fopenmp, glibc's vector
    expf/erff/tanhf): a probe with the same flags, compiled once into a temp dir and called through
    ctypes with torch's thread count. Per element: "exp"/"erf"/"tanh" evaluations/s and "flops"
    (register-level FMA throughput), each as a slope (call and fork/join costs cancel); the
    "cache_bandwidth" (2 MB arrays) and "dram_bandwidth" (2 x 256 MB) of a streaming loop, read + write
    bytes/s (torch's copy_ streams faster than plain compiled loops); "overlap", the fraction of the
    smaller of memory and compute time that hides under the larger in a DRAM-sized expf stream (1 = the
    roofline max, 0 = they add up). {} when no compiler is available
    (the ATen numbers are used then). `cxx`: the compiler (calibration has no Config; None = resolve_cxx's
    default, $FUSION_CXX or g++, the one generated kernels get)."""
    import shutil
    import subprocess

    cxx = resolve_cxx(cxx)
    if not shutil.which(cxx):
        return {}
    flags = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno",
             "-fno-trapping-math", "-shared", "-fPIC", "-std=c++17"]
    with tempfile.TemporaryDirectory(prefix="fusion-probe-") as d:
        src, so = os.path.join(d, "probe.cpp"), os.path.join(d, "probe.so")
        Path(src).write_text(_PROBE)
        try:
            res = subprocess.run([cxx, *flags, src, "-o", so], capture_output=True, timeout=60, check=False)
            if res.returncode != 0:
                return {}
            lib = ctypes.CDLL(so)
        except (OSError, subprocess.SubprocessError):
            return {}
        x = torch.rand(n) * 4 - 2
        y = torch.empty(n)
        xp, yp = x.data_ptr(), y.data_ptr()
        nt = torch.get_num_threads()
        out = {}
        for key, sym in (("exp", "p_exp"), ("erf", "p_erf"), ("tanh", "p_tanh"), ("flops", "p_fma")):
            fn = getattr(lib, sym)
            fn.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
            fn.restype = None
            r = slope(lambda k, fn=fn: fn(nt, k, xp, yp), n, reps, max(1, (1 << 20) // n))
            out[key] = r * (_PROBE_FLOPS if key == "flops" else 1)
        # streaming y = 1.5 * x the way generated code does (read + write bytes / s): in the LLC and in DRAM
        fn = lib.p_scale
        fn.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = None
        out["cache_bandwidth"] = 8 * slope(lambda k: fn(nt, k, xp, yp), n, reps, max(1, (1 << 20) // n))
        big = max(n, dram_elems)
        xb, yb = torch.ones(big), torch.zeros(big)
        out["dram_bandwidth"] = 8 * big / best(lambda: fn(nt, big, xb.data_ptr(), yb.data_ptr()), reps)
        # how much of the compute hides under the DRAM traffic: expf over the same 2 x 256 MB stream.
        # t = max(t_mem, t_exp) + (1 - overlap) * min(t_mem, t_exp)  ->  overlap in [0, 1]
        t_big = best(lambda: lib.p_exp(nt, big, xb.data_ptr(), yb.data_ptr()), reps)
        t_mem, t_cmp = 8 * big / out["dram_bandwidth"], big / out["exp"]
        ov = (t_mem + t_cmp - t_big) / min(t_mem, t_cmp)
        out["overlap"] = min(max(ov, 0.0), 1.0)
        return out
