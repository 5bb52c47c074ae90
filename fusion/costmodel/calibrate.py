"""Measure this machine (<= ~3 s): bandwidths, GEMM and pointwise rates, call overheads.

    calibrate(scale=1.0) -> HardwareProfile            # measure now, store nothing

Measuring only: `fusion.costmodel.profile_store` keeps the result (load_or_calibrate, current_profile) and
`python -m fusion calibrate` prints it.

Every measurement uses torch ops on PRE-ALLOCATED tensors (out= variants) with
torch.get_num_threads() threads, and keeps the best (minimum) time of a few repetitions: on a
shared machine the minimum is the least noisy estimate of what the hardware can do.

What is measured (units: bytes/s, FLOP/s, evaluations/s, seconds):
    copy_bandwidth        dst.copy_(src) of a 256 MB tensor (>= 4x L3), (read + write bytes) / s
    cache_bandwidth       the same copy with a 2 x 4 MB working set (fits the last-level cache)
    gemm_flops            torch.mm out= at 1024 (fp32) / 2048 (bf16), torch._int_mm at 2048 (int8); and
                          "float32_onednn": oneDNN's fp32 linear at 1024 (fusion/passes/gemm.py picks the faster)
    vector_flops          torch.addcmul(a, b, c, out=o) on an in-cache working set, 2 FLOPs/element, as
                          the slope between 32 k and 256 k elements (per-call costs cancel: _slope_rate).
                          Conservative: ATen pointwise ops are load/store bound even in cache; a fused
                          kernel doing many FLOPs per element in registers can exceed it.
    transcendental_rate   harmonic mean of the exp / tanh / erf rates (torch.exp(x, out=o), ...), each the
                          slope between 64 k and 512 k elements (in cache; per-call costs cancel)
    aten_overhead         s per torch.ops.aten.add.Tensor call on 1-element tensors from Python
    view_overhead         s per view-op call (aten.view / aten.permute) from Python: no data moves, but
                          an FX program still dispatches every view node
    kernel_overhead       s per call of a generated kernel from an FX program: a replica of the
                          fusion.backends.cpp.runtime wrapper (nn.Module call, shape/stride checks, the ctypes int64
                          array of sizes, the output buffer, data_ptr()s, a ctypes call with 6 arguments
                          into libc memcpy(p, p, 0)). A bare ctypes call is 0.3 us; the wrapper ~3 us.
    graph_call_overhead   s per call of an FX GraphModule (Python forward, argument binding, output tuple)
    parallel_overhead     s per OpenMP parallel region: t(add of 2*GRAIN elements, all threads) -
                          t(add of GRAIN elements, one thread): both do GRAIN elements per thread, the
                          difference is the fork/join of the thread team (0 with one thread)
    gemm_curve            fp32 FLOP/s of torch.mm out= at n = 32, 64, 128, 256, 512 (small GEMMs do not
                          reach the peak: packing, threading and the call are fixed costs)
    fresh_write_bandwidth (read + write bytes) / s of torch.empty(64 MB) + copy_ + free: glibc mmaps
                          and munmaps such allocations on every call, so each page is faulted in again
    page_fault_bandwidth  bytes written / (t_fresh - t_reused): the extra cost per freshly mapped byte
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import datetime
import sys
import functools
import time
from typing import Callable

import torch

from fusion.costmodel import hardware
from fusion.costmodel.hardware import ATTENTION_KEY, BMM_KEY, ONEDNN_KEY, HardwareProfile, cpu_model, llc_bytes, machine_key
from fusion.costmodel.kernel_probe import kernel_rates

#: the clock every measuring function takes (`clock=`, passed down from calibrate): wall time, or
#: (calibrate(cpu_clock=True), one thread only) the CPU time of the process, which excludes the time other
#: processes hold the CPU: a load-robust estimate of what a quiet machine does (with several threads it
#: would add up the threads, so it is refused)
Clock = Callable[[], float]
WALL: Clock = time.perf_counter
#: what the stored profile's fields mean. 2: kernel_overhead is the runtime wrapper (not a bare ctypes
#: call); view/graph-call/parallel overheads and the small-GEMM curve exist. 3: slope-based rates, ATen
#: op rates (gelu/silu/softmax) and generated-kernel rates. 4: bmm and attention (SDPA) rate curves.
#: Older files are re-measured.
SCHEMA = 4
MB = 1 << 20


# ----------------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------------
def _best(fn, reps: int, inner: int = 1, budget_s: float = 0.25, clock: Clock = WALL) -> float:
    """Minimum seconds per call of fn (timed with `clock`) over up to `reps` timed batches of up to `inner`
    calls (after one warm-up call). Batches are kept near 20 ms and the step stops after `budget_s` of wall
    time, so a busy machine makes the calibration less precise, not much longer."""
    t0 = clock()
    fn()
    one = clock() - t0
    inner = max(1, min(inner, int(0.02 / max(one, 1e-9))))
    deadline = time.perf_counter() + budget_s
    best = float("inf")
    for _ in range(reps):
        t0 = clock()
        for _ in range(inner):
            fn()
        best = min(best, (clock() - t0) / inner)
        if time.perf_counter() > deadline:
            break
    return best


def _copy_bandwidth(nbytes: int, reps: int, clock: Clock = WALL) -> float:
    n = max(nbytes // 4, 1024)
    src = torch.empty(n, dtype=torch.float32).fill_(1.0)
    dst = torch.empty(n, dtype=torch.float32).fill_(0.0)
    inner = max(1, int(64 * MB // (8 * n)))            # small copies: batch to beat timer resolution
    t = _best(lambda: dst.copy_(src), reps, inner, clock=clock)
    return 2 * n * 4 / t


def _fresh_write(nbytes: int, reps: int, clock: Clock = WALL) -> tuple[float, float]:
    """(fresh (read+write) bytes/s, page-fault bytes/s) for copies into freshly allocated tensors."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32).fill_(1.0)
    dst = torch.empty(n, dtype=torch.float32).fill_(0.0)
    t_reuse = _best(lambda: dst.copy_(src), reps, clock=clock)
    t_fresh = _best(lambda: torch.empty(n, dtype=torch.float32).copy_(src), reps, clock=clock)
    fresh_bw = 2 * n * 4 / t_fresh
    extra = t_fresh - t_reuse
    fault_bw = n * 4 / extra if extra > 1e-6 else 0.0
    return fresh_bw, fault_bw


def _gemm_flops_onednn(n: int, reps: int, clock: Clock = WALL) -> float:
    """fp32 FLOP/s of oneDNN's linear (what fusion/passes/gemm.py calls instead of ATen's MKL mm), 0 without it."""
    try:
        if not torch.backends.mkldnn.is_available():
            return 0.0
        op = torch.ops.mkldnn._linear_pointwise.default
        a, w = torch.randn(n, n), torch.randn(n, n)
        return 2 * n**3 / _best(lambda: op(a, w, None, "none", [], ""), reps, clock=clock)
    except (AttributeError, RuntimeError):
        return 0.0


#: oneDNN's fp32 GEMM scaled from 1 to 2 threads 0.75x as well as MKL's here (1.67x / 2.2x)
THREAD_SCALING_FLOOR = 0.75


def _onednn_over_mkl(n: int, rounds: int, clock: Clock = WALL) -> float:
    """oneDNN fp32 GEMM rate / MKL's (torch.mm) with the profile's threads, measured alternately so that
    load hits both alike. On a loaded machine a multi-threaded GEMM loses most when one of its threads is
    descheduled, and how much depends on the library's synchronisation (here: 0.7x at load 4, 1.67x
    quiet), so the one-thread ratio (the kernels themselves: 2.2x here at any load), discounted by
    `THREAD_SCALING_FLOOR` for the worse thread scaling measured here, is a floor under it."""
    def ratio() -> float:
        mkl, dnn = [], []
        for _ in range(rounds):
            mkl.append(_gemm_flops(torch.float32, n, 2, clock))
            dnn.append(_gemm_flops_onednn(n, 2, clock))
        return max(dnn) / max(mkl) if max(mkl) and max(dnn) else 0.0

    threads = torch.get_num_threads()
    r = ratio()
    if threads > 1:
        torch.set_num_threads(1)
        try:
            r = max(r, THREAD_SCALING_FLOOR * ratio())
        finally:
            torch.set_num_threads(threads)
    return r


def _gemm_flops(dtype: torch.dtype, n: int, reps: int, clock: Clock = WALL) -> float:
    if dtype == torch.int8:
        if not hasattr(torch, "_int_mm"):
            return 0.0
        a = torch.randint(-64, 64, (n, n), dtype=torch.int8)
        b = torch.randint(-64, 64, (n, n), dtype=torch.int8)
        c = torch.empty(n, n, dtype=torch.int32)
        try:
            fn = lambda: torch._int_mm(a, b, out=c)   # noqa: E731
            fn()
        except (RuntimeError, TypeError):
            fn = lambda: torch._int_mm(a, b)           # noqa: E731
    else:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        c = torch.empty(n, n, dtype=dtype)
        fn = lambda: torch.mm(a, b, out=c)             # noqa: E731
    try:
        return 2 * n**3 / _best(fn, reps, clock=clock)
    except RuntimeError:
        return 0.0


def _slope_rate(run, n: int, reps: int, inner: int, clock: Clock = WALL) -> float:
    """Elements per second of run(k) (one op over k elements) as the SLOPE between k = n/8 and k = n:
    the per-call costs (Python dispatch, OpenMP fork/join) are the same at both sizes and cancel, so
    they are not mistaken for a low throughput (they are charged separately, per call)."""
    n1 = max(n // 8, 1)
    t1 = _best(lambda: run(n1), reps, inner * 8, clock=clock)
    t2 = _best(lambda: run(n), reps, inner, clock=clock)
    if t2 > t1 * 1.2:
        return (n - n1) / (t2 - t1)
    return n / t2                                     # too noisy to separate: the plain (lower) rate


def _vector_flops(n: int, reps: int, clock: Clock = WALL) -> float:
    a, b, c, o = (torch.rand(n) for _ in range(4))
    inner = max(1, (1 << 22) // n)
    return 2 * _slope_rate(lambda k: torch.addcmul(a[:k], b[:k], c[:k], out=o[:k]), n, reps, inner, clock)


def _transcendental_rates(n: int, reps: int, clock: Clock = WALL) -> dict[str, float]:
    x = torch.rand(n) * 4 - 2
    o = torch.empty(n)
    inner = max(1, (1 << 20) // n)
    return {
        name: _slope_rate(lambda k, f=f: f(x[:k], out=o[:k]), n, reps, inner, clock)
        for name, f in (("exp", torch.exp), ("tanh", torch.tanh), ("erf", torch.erf))
    }


def _aten_overhead(calls: int, clock: Clock = WALL) -> float:
    a, b = torch.ones(1), torch.ones(1)
    add = torch.ops.aten.add.Tensor
    return _best(lambda: add(a, b), 5, calls, clock=clock)


#: ATen ops with their own vectorised approximations (gelu's erf, silu's and softmax's exp are faster
#: than torch.erf / torch.exp): (op, FLOPs per element besides the transcendental, row length or 0)
_OP_RATES = (("gelu", 4, 0), ("silu", 3, 0), ("sigmoid", 2, 0), ("softmax", 4, 1024))


def _op_rates(n: int, reps: int, vector_flops: float, clock: Clock = WALL) -> dict[str, float]:
    """Per ATen op: transcendental evaluations/s INSIDE the op, i.e. n / (t_op - FLOPs / vector_flops),
    the op's time measured as a slope (per-call costs cancel), so that the model's compute term
    FLOPs / vector_flops + n / rate reproduces the op's measured throughput."""
    x = torch.rand(n) * 4 - 2
    out = {}
    for name, f, row in _OP_RATES:
        if name == "gelu":
            run = lambda k: torch.ops.aten.gelu.default(x[:k])                   # noqa: E731
        elif name == "silu":
            run = lambda k: torch.nn.functional.silu(x[:k])                    # noqa: E731
        elif name == "sigmoid":
            run = lambda k: torch.sigmoid(x[:k])                               # noqa: E731
        else:
            run = lambda k: torch._softmax(x[:k].view(-1, row), -1, False)     # noqa: E731
        r = _slope_rate(run, n, reps, max(1, (1 << 20) // n), clock)
        t_tr = 1.0 / r - f / vector_flops
        out[name] = 1.0 / t_tr if t_tr > 0.1 / r else r
    return out


def _view_overhead(calls: int, clock: Clock = WALL) -> float:
    x = torch.ones(4, 4)
    view, permute = torch.ops.aten.view.default, torch.ops.aten.permute.default
    return _best(lambda: (view(x, [16]), permute(x, [1, 0])), 5, calls, clock=clock) / 2


def _kernel_call_overhead(calls: int, clock: Clock = WALL) -> float:
    """A replica of what fusion.backends.cpp.runtime does to call one generated kernel (see the module docstring)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    fn = libc.memcpy
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_void_p] * 3
    fn.restype = ctypes.c_void_p
    M = ctypes.c_int64 * 3
    pool = [torch.empty(4, 16)]

    class Wrapper(torch.nn.Module):
        def forward(self, x0, x1):
            sh0, sh1 = x0.shape, x1.shape
            D0, D1 = sh0[0], sh0[1]
            if sh1[0] != D1:
                raise RuntimeError("shape")
            if D1 > 1 and x0.stride(1) != 1:
                x0 = x0.contiguous()
            st0 = x0.stride()
            m = M(D0, D1, st0[0])
            o0 = pool[0] if pool[0].shape == sh0 else torch.empty(D0, D1)
            p = o0.data_ptr()
            fn(p, p, 0, x0.data_ptr(), x1.data_ptr(), ctypes.addressof(m))
            return o0

    w, x, y = Wrapper(), torch.ones(4, 16), torch.ones(16)
    return _best(lambda: w(x, y), 5, calls, clock=clock)


def _graph_call_overhead(calls: int, clock: Clock = WALL) -> float:
    gm = torch.fx.symbolic_trace(lambda x: (x,))
    x = torch.ones(1)
    return _best(lambda: gm(x), 5, calls, clock=clock)


def _parallel_overhead(reps: int, clock: Clock = WALL) -> float:
    """Fork/join of one OpenMP parallel region (see the module docstring); 0 with one thread."""
    threads = torch.get_num_threads()
    if threads < 2:
        return 0.0
    grain = 32768
    a, b = torch.rand(2 * grain), torch.rand(2 * grain)
    o = torch.empty(2 * grain)
    a1, b1, o1 = a[:grain], b[:grain], o[:grain]
    t_par = _best(lambda: torch.add(a, b, out=o), reps, 200, clock=clock)
    t_one = _best(lambda: torch.add(a1, b1, out=o1), reps, 200, clock=clock)   # <= grain: runs on one thread
    return max(t_par - t_one, 0.0)


def _gemm_curve(sizes, reps: int, clock: Clock = WALL) -> list[list[float]]:
    """[[FLOPs, FLOP/s], ...] ascending. A bigger GEMM is never slower per FLOP than a smaller one on
    this hardware, and contention only ever slows a measurement down, so each rate is raised to the
    best rate of the smaller sizes before it (a preempted long GEMM must not bend the curve down)."""
    out, best = [], 0.0
    for n in sizes:
        a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        t = _best(lambda: torch.mm(a, b, out=c), reps, 50, clock=clock)
        best = max(best, 2.0 * n ** 3 / t)
        out.append([2.0 * n ** 3, best])
    return out


#: the head shape BMM_KEY and ATTENTION_KEY are measured at: [HEADS, S, HEAD_DIM] operands, S from the
#: calibration's sizes (below 16: one head of 16, where each call's fixed cost dominates)
HEADS, HEAD_DIM = 12, 64


def _attention_curves(sizes, reps: int, vec: float, exp_rate: float,
                      clock: Clock = WALL) -> dict[str, list[list[float]]]:
    """{BMM_KEY: [[FLOPs per call, FLOP/s], ...], ATTENTION_KEY: [...]} at S in `sizes`.

    A batched product over heads with K or N = 64 runs far below the square-GEMM rate (MKL's batched
    path: ~0.45x here at S=2048), while SDPA's blocked kernel keeps its scores in cache; pricing both at
    the square-GEMM rate made extraction keep bmm + softmax + bmm where one attention call is 2-4x faster.
    Attention's rate is over its GEMM FLOPs after subtracting its pointwise and exp work at the rates the
    model prices them (`roofline._sdpa_cost`: 6 FLOPs and 1 exp per score), so the model reproduces the
    measured time; at least a quarter of the time is left to the GEMMs."""
    import torch.nn.functional as F

    bmm, attn = [], []
    for n in sizes:
        h, d = (HEADS, HEAD_DIM) if n >= 16 else (1, 16)             # the smallest: each call's fixed cost
        q, k, v = (torch.randn(1, h, n, d) for _ in range(3))
        mask = torch.randn(1, 1, n, n)
        s = torch.empty(h, n, n)
        qb, kt, vb = q[0], k[0].transpose(1, 2), v[0]
        flops = 2.0 * h * n * n * d                                  # one of the two products
        t_bmm = (_best(lambda: torch.bmm(qb, kt, out=s), reps, 20, clock=clock)
                 + _best(lambda: torch.bmm(s, vb), reps, 20, clock=clock))
        t_att = _best(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), reps, 20, clock=clock)
        scores = h * n * n
        rest = 6.0 * scores / vec + scores / exp_rate
        bmm.append([flops, 2 * flops / t_bmm])
        attn.append([2 * flops, 2 * flops / max(t_att - rest, 0.25 * t_att)])
    return {BMM_KEY: bmm, ATTENTION_KEY: attn}


def calibrate(scale: float = 1.0, verbose: bool = False, cpu_clock: bool = False) -> HardwareProfile:
    """Measure now. scale=1 takes ~3-4 s on 2 cores; scale<1 shrinks sizes and repetitions (tests).
    cpu_clock: time with the process CPU clock (one torch thread only; see Clock), passed down to every
    measurement (no global state: a calibration cannot change the clock of another)."""
    if cpu_clock and torch.get_num_threads() != 1:
        raise ValueError("cpu_clock=True needs torch.set_num_threads(1): CPU time adds up the threads")
    hw = _calibrate(scale, verbose, time.process_time if cpu_clock else WALL)
    if cpu_clock:
        hw = dataclasses.replace(hw, source=hw.source + ", process CPU clock (load-robust, 1 thread)")
    elif hardware.is_noisy(hw.calibration_load) and torch.get_num_threads() > 1:
        # under contention OpenMP barriers wait for descheduled threads (ms, not us): these multi-thread
        # quantities would be off by 100-1000x. Left unmeasured (the model then uses the ATen rates, the
        # large-GEMM peak, no fork/join term) until a quiet machine re-measures and merges.
        hw = dataclasses.replace(hw, parallel_overhead=0.0, gemm_curve={}, kernel_rates={},
                                 source=hw.source + "; noisy: fork/join, GEMM curve, kernel rates not kept")
    return hw


def _calibrate(scale: float, verbose: bool, clock: Clock = WALL) -> HardwareProfile:
    """Every measurement, timed with `clock`, into a HardwareProfile."""
    t_start = time.perf_counter()
    load = hardware.load_average()
    full = scale >= 1.0
    reps = 5 if full else 2
    llc = llc_bytes()
    steps: list[tuple[str, float]] = []

    def step(name: str, fn):
        t0 = time.perf_counter()
        r = fn()
        steps.append((name, time.perf_counter() - t0))
        return r

    with torch.no_grad():
        big = max(int(256 * MB * scale), 4 * MB)
        copy_bw = step("copy", lambda: _copy_bandwidth(big, reps, clock))
        cache_bw = step("cache", lambda: _copy_bandwidth(min(4 * MB, max(llc // 8, 256 << 10)), reps, clock))
        fresh_bw, fault_bw = step("fresh", lambda: _fresh_write(max(int(64 * MB * scale), 4 * MB), reps, clock))
        g_reps = 3 if full else 2
        gemm = {
            "float32": step("gemm32", lambda: _gemm_flops(torch.float32, 1024 if full else 256, g_reps, clock)),
            "bfloat16": step("gemm16", lambda: _gemm_flops(torch.bfloat16, 2048 if full else 256, g_reps, clock)),
            "int8": step("gemm8", lambda: _gemm_flops(torch.int8, 2048 if full else 256, g_reps, clock)),
        }
        # oneDNN vs MKL: the ratio, measured alternately (a busy machine hurts oneDNN's OpenMP threads
        # much more than MKL's; measured one after the other the two rates are not comparable)
        ratio = step("gemm32-onednn", lambda: _onednn_over_mkl(512 if full else 256, 3 if full else 2, clock))
        gemm[ONEDNN_KEY] = ratio * gemm["float32"]
        gemm = {k: v for k, v in gemm.items() if v > 0}
        gemm.setdefault("float32", 1e10)
        vec = step("vector", lambda: _vector_flops(1 << 18 if full else 1 << 15, reps, clock))    # 4 x 1 MB: in cache
        rates = step("transc", lambda: _transcendental_rates(1 << 19 if full else 1 << 15, reps, clock))
        rates.update(step("op-rates", lambda: _op_rates(1 << 19 if full else 1 << 15, reps, vec, clock)))
        krates = step("kernel-rates", lambda: kernel_rates(1 << 19 if full else 1 << 15, reps, big // 4,
                                                           best=functools.partial(_best, clock=clock),
                                                           slope=functools.partial(_slope_rate, clock=clock)))
        aten_oh = step("aten", lambda: _aten_overhead(2000 if full else 200, clock))
        kern_oh = step("kernel", lambda: _kernel_call_overhead(2000 if full else 200, clock))
        view_oh = step("view", lambda: _view_overhead(2000 if full else 200, clock))
        graph_oh = step("graph", lambda: _graph_call_overhead(2000 if full else 200, clock))
        par_oh = step("parallel", lambda: _parallel_overhead(reps, clock))
        curve = step("gemm-curve", lambda: _gemm_curve((32, 64, 128, 256, 512) if full else (32, 64), reps, clock))
        heads = step("attention", lambda: _attention_curves((4, 16, 64, 128, 512, 1024) if full else (4, 16, 64), reps, vec,
                                                             rates.get("exp", 1e9), clock))
    if curve:                                          # the peak is at least the best small-GEMM rate
        gemm["float32"] = max(gemm["float32"], curve[-1][1])
    for key, pts in heads.items():                     # beyond the largest size: its rate
        gemm[key] = pts[-1][1]
    base = [rates[k] for k in ("exp", "tanh", "erf") if k in rates]
    tr = len(base) / sum(1.0 / r for r in base)
    total = time.perf_counter() - t_start
    if verbose:
        print("calibration steps: " + ", ".join(f"{n} {t * 1e3:.0f} ms" for n, t in steps), file=sys.stderr)
    return HardwareProfile(
        name=f"{cpu_model()} x{torch.get_num_threads()} threads",
        copy_bandwidth=copy_bw,
        cache_bandwidth=cache_bw,
        llc_bytes=llc,
        gemm_flops=gemm,
        vector_flops=vec,
        transcendental_rate=tr,
        kernel_overhead=kern_oh,
        aten_overhead=aten_oh,
        page_fault_bandwidth=fault_bw,
        transcendental_rates=rates,
        view_overhead=view_oh,
        kernel_rates=krates,
        graph_call_overhead=graph_oh,
        parallel_overhead=par_oh,
        gemm_curve={"float32": curve + [[2.0 * 1024 ** 3, max(gemm["float32"], curve[-1][1])]] if full else curve,
                    **heads},
        fresh_write_bandwidth=fresh_bw,
        measured=True,
        source=(f"calibrated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC in "
                f"{total:.2f} s, scale {scale:g}, torch {torch.__version__}"),
        key=machine_key(),
        calibration_load=load,
        schema=SCHEMA,
    )


