"""Which int8 form a linear starts as: measured on its own shape, on this machine.

    times = linear_times(rows, k, n)   # {"int8": s, "int8_weight_only": s, "fp32": s}, min of interleaved runs
    ladder = int8_ladder(rows, k, n)   # ("int8", "int8_weight_only") or ("int8_weight_only",)

The two int8 forms trade differently with the row count: dynamic W8A8 (`quantize_rows` + `int8_matmul`)
runs the GEMM on int8 VNNI units but pays two extra passes (quantization, epilogue) and three calls;
weight-only int8 (`int8_weight_only_linear`) streams 4x fewer weight bytes but does fp32 math (for few rows
`_weight_int8pack_mm`, else dequantize + fp32 GEMM). Which one wins depends on the CPU's int8 GEMM, its
fp32 GEMM libraries and the shape, so the pass times both (and the exact fp32 linear, for the report) on
random data of the site's shape: a few milliseconds per distinct shape, cached per process. The faster one
starts; weight-only stays the guard's more accurate fallback when W8A8 starts.
"""
from __future__ import annotations

import time

import torch

from fusion.approx import ops as approx_ops

REPS = 3
#: the timed weight has at most this many elements (4 MiB in fp32): a wider layer is timed on a slice of its
#: output channels and the times scaled up, so choosing costs no more memory than that (int8 conversion
#: promises fp32 weights + one layer at most) and little time
MAX_WEIGHT_NUMEL = 1 << 20
_CACHE: dict[tuple, dict[str, float]] = {}


def linear_times(rows: int, k: int, n: int) -> dict[str, float]:
    """Seconds per call (min over REPS interleaved runs) of a [rows, k] x [k, n] linear with bias in each form."""
    key = (rows, k, n, torch.get_num_threads())
    if key in _CACHE:
        return _CACHE[key]
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    n_timed = max(1, min(n, MAX_WEIGHT_NUMEL // max(k, 1)))
    with unset_fake_temporarily(), torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        x, w = torch.randn(rows, k, generator=gen), torch.randn(n_timed, k, generator=gen)
        b = torch.randn(n_timed, generator=gen)
        wq, ws = approx_ops._quantize_weight(w, False)
        fns = {
            "int8": lambda: approx_ops._int8_matmul(*approx_ops._quantize_rows_op(x), wq, ws, b, False, "none"),
            "int8_weight_only": lambda: approx_ops._int8_weight_only_linear(x, wq, ws, b, False),
            "fp32": lambda: torch.addmm(b, x, w.t()),
        }
        best = {name: float("inf") for name in fns}
        for f in fns.values():   # warm-up (oneDNN primitive creation, first-touch of buffers)
            f()
        for _ in range(REPS):
            for name, f in fns.items():
                t0 = time.perf_counter()
                f()
                best[name] = min(best[name], time.perf_counter() - t0)
    best = {name: t * n / n_timed for name, t in best.items()}
    _CACHE[key] = best
    return best


def int8_ladder(rows: int, k: int, n: int) -> tuple[tuple[str, ...], dict[str, float]]:
    """(int8 forms of a linear site, fastest first, each later one the more accurate fallback; the times)."""
    t = linear_times(rows, k, n)
    ladder = ("int8", "int8_weight_only") if t["int8"] <= t["int8_weight_only"] else ("int8_weight_only",)
    return ladder, t
