"""Measure this machine once (<= ~3 s), store the profile as JSON, reload it afterwards.

    load_or_calibrate(cache_dir=None) -> HardwareProfile
    calibrate(scale=1.0) -> HardwareProfile            # measure now, store nothing
    python -m costmodel.calibrate [--json] [--force] [--cache-dir D] [--datasheet]

Every measurement uses torch ops on PRE-ALLOCATED tensors (out= variants) with
torch.get_num_threads() threads, and keeps the best (minimum) time of a few repetitions: on a
shared machine the minimum is the least noisy estimate of what the hardware can do.

What is measured (units: bytes/s, FLOP/s, evaluations/s, seconds):
    copy_bandwidth        dst.copy_(src) of a 256 MB tensor (>= 4x L3), (read + write bytes) / s
    cache_bandwidth       the same copy with a 2 x 4 MB working set (fits the last-level cache)
    gemm_flops            torch.mm out= at 1024 (fp32) / 2048 (bf16), torch._int_mm at 2048 (int8)
    vector_flops          torch.addcmul(a, b, c, out=o) on an in-cache working set, 2 FLOPs/element.
                          Conservative: ATen pointwise ops are load/store bound even in cache; a fused
                          kernel doing many FLOPs per element in registers can exceed it.
    transcendental_rate   harmonic mean of the exp / tanh / erf rates (torch.exp(x, out=o), ...)
    aten_overhead         s per torch.ops.aten.add.Tensor call on 1-element tensors from Python
    kernel_overhead       s per ctypes call of libc memcpy(dst, src, 0): the proxy for calling one
                          generated kernel (a few integer/pointer arguments) from Python
    fresh_write_bandwidth (read + write bytes) / s of torch.empty(64 MB) + copy_ + free: glibc mmaps
                          and munmaps such allocations on every call, so each page is faulted in again
    page_fault_bandwidth  bytes written / (t_fresh - t_reused): the extra cost per freshly mapped byte
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from costmodel.hardware import HardwareProfile

_MEMO: dict[str, HardwareProfile] = {}
MB = 1 << 20


# ----------------------------------------------------------------------------------------------
# machine identity and storage
# ----------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def llc_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 32 MiB if unknown."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for d in base.glob("index*"):
            txt = (d / "size").read_text().strip().upper()
            m = re.match(r"(\d+)([KMG]?)", txt)
            if m:
                mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]
                best = max(best, int(m.group(1)) * mult)
    except OSError:
        pass
    return best or 32 * MB


def machine_key() -> str:
    """CPU model, logical CPU count, torch threads and torch version, safe as a file name."""
    raw = f"{cpu_model()}-{os.cpu_count()}cpu-{torch.get_num_threads()}thr-torch{torch.__version__}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", raw).strip("_")


def cache_root(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get("FUSION_CACHE_DIR") or Path.home() / ".cache" / "fusion")


def profile_path(cache_dir: str | None = None) -> Path:
    return cache_root(cache_dir) / "profiles" / f"{machine_key()}.json"


def profile_from_json(d: dict) -> HardwareProfile:
    names = {f.name for f in dataclasses.fields(HardwareProfile)}
    return HardwareProfile(**{k: v for k, v in d.items() if k in names})


def save_profile(hw: HardwareProfile, path: Path) -> None:
    """Atomic write: tmp file in the same dir, then os.replace. Dirs are created with mode 0o700."""
    for d in reversed([path.parent, *path.parent.parents]):    # every dir we create gets 0o700
        if not d.exists():
            d.mkdir(mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(hw.to_json(), f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return -1.0


def is_noisy(load: float) -> bool:
    """Was (or is) the machine busy enough to distort a calibration? 1-min load >= 0.75 per CPU."""
    return load >= 0.75 * (os.cpu_count() or 1)


def merge_best(a: HardwareProfile, b: HardwareProfile) -> HardwareProfile:
    """Element-wise best of two calibrations of the same machine: the larger throughput, the smaller
    overhead. Contention only ever makes a measurement look worse, so the best of several is closest
    to what the hardware does."""
    hi = lambda x, y: max(x, y)                        # noqa: E731
    lo = lambda x, y: min(x, y) if x > 0 and y > 0 else max(x, y)   # noqa: E731
    gemm = {k: hi(a.gemm_flops.get(k, 0.0), b.gemm_flops.get(k, 0.0)) for k in {*a.gemm_flops, *b.gemm_flops}}
    rates = {k: hi(a.transcendental_rates.get(k, 0.0), b.transcendental_rates.get(k, 0.0))
             for k in {*a.transcendental_rates, *b.transcendental_rates}}
    return dataclasses.replace(
        b, copy_bandwidth=hi(a.copy_bandwidth, b.copy_bandwidth), cache_bandwidth=hi(a.cache_bandwidth, b.cache_bandwidth),
        gemm_flops=gemm, vector_flops=hi(a.vector_flops, b.vector_flops),
        transcendental_rate=hi(a.transcendental_rate, b.transcendental_rate), transcendental_rates=rates,
        kernel_overhead=lo(a.kernel_overhead, b.kernel_overhead), aten_overhead=lo(a.aten_overhead, b.aten_overhead),
        page_fault_bandwidth=hi(a.page_fault_bandwidth, b.page_fault_bandwidth),
        fresh_write_bandwidth=hi(a.fresh_write_bandwidth, b.fresh_write_bandwidth),
        calibration_load=min((x for x in (a.calibration_load, b.calibration_load) if x >= 0), default=-1.0),
        source=b.source + " (merged with an earlier calibration: best of both)",
    )


def load_or_calibrate(cache_dir: str | None = None, *, force: bool = False, scale: float = 1.0) -> HardwareProfile:
    """The calibrated profile of this machine: from <cache>/profiles/<machine-key>.json when present and
    valid, else measured now (<= ~3 s) and stored. `force` re-measures; `scale` < 1 shrinks the sizes
    (tests). An unwritable cache dir only costs the re-measurement next time (never an error).

    A stored profile measured on a busy machine (calibration_load high) is measured again once the
    machine is quiet, and the two are merged (best of both)."""
    path = profile_path(cache_dir)
    memo_key = f"{path}|{scale}"
    if not force and memo_key in _MEMO:
        return _MEMO[memo_key]
    hw = None
    if not force and path.is_file():
        try:
            hw = profile_from_json(json.loads(path.read_text()))
            if hw.key and hw.key != machine_key():
                hw = None
        except (OSError, ValueError, TypeError):
            hw = None                                  # corrupt or from an older schema: re-measure
    if hw is not None and is_noisy(hw.calibration_load) and not is_noisy(_load_average()):
        hw = merge_best(hw, calibrate(scale=scale))
        try:
            save_profile(hw, path)
        except OSError:
            pass
    if hw is None:
        hw = calibrate(scale=scale)
        try:
            save_profile(hw, path)
        except OSError as e:                           # read-only home etc.: keep the in-memory profile
            print(f"costmodel: could not store the profile at {path}: {e}", file=sys.stderr)
    _MEMO[memo_key] = hw
    return hw


# ----------------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------------
def _best(fn, reps: int, inner: int = 1, budget_s: float = 0.25) -> float:
    """Minimum seconds per call of fn over up to `reps` timed batches of up to `inner` calls (after one
    warm-up call). Batches are kept near 20 ms and the step stops after `budget_s`, so a busy machine
    makes the calibration less precise, not much longer."""
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    inner = max(1, min(inner, int(0.02 / max(one, 1e-9))))
    deadline = time.perf_counter() + budget_s
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
        if time.perf_counter() > deadline:
            break
    return best


def _copy_bandwidth(nbytes: int, reps: int) -> float:
    n = max(nbytes // 4, 1024)
    src = torch.empty(n, dtype=torch.float32).fill_(1.0)
    dst = torch.empty(n, dtype=torch.float32).fill_(0.0)
    inner = max(1, int(64 * MB // (8 * n)))            # small copies: batch to beat timer resolution
    t = _best(lambda: dst.copy_(src), reps, inner)
    return 2 * n * 4 / t


def _fresh_write(nbytes: int, reps: int) -> tuple[float, float]:
    """(fresh (read+write) bytes/s, page-fault bytes/s) for copies into freshly allocated tensors."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32).fill_(1.0)
    dst = torch.empty(n, dtype=torch.float32).fill_(0.0)
    t_reuse = _best(lambda: dst.copy_(src), reps)
    t_fresh = _best(lambda: torch.empty(n, dtype=torch.float32).copy_(src), reps)
    fresh_bw = 2 * n * 4 / t_fresh
    extra = t_fresh - t_reuse
    fault_bw = n * 4 / extra if extra > 1e-6 else 0.0
    return fresh_bw, fault_bw


def _gemm_flops(dtype: torch.dtype, n: int, reps: int) -> float:
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
        return 2 * n**3 / _best(fn, reps)
    except RuntimeError:
        return 0.0


def _vector_flops(n: int, reps: int) -> float:
    a, b, c, o = (torch.rand(n) for _ in range(4))
    inner = max(1, (1 << 22) // n)
    return 2 * n / _best(lambda: torch.addcmul(a, b, c, out=o), reps, inner)


def _transcendental_rates(n: int, reps: int) -> dict[str, float]:
    x = torch.rand(n) * 4 - 2
    o = torch.empty(n)
    inner = max(1, (1 << 20) // n)
    return {
        name: n / _best(lambda f=f: f(x, out=o), reps, inner)
        for name, f in (("exp", torch.exp), ("tanh", torch.tanh), ("erf", torch.erf))
    }


def _aten_overhead(calls: int) -> float:
    a, b = torch.ones(1), torch.ones(1)
    add = torch.ops.aten.add.Tensor
    return _best(lambda: add(a, b), 5, calls)


def _ctypes_overhead(calls: int) -> float:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    memcpy = libc.memcpy
    memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    memcpy.restype = ctypes.c_void_p
    buf = torch.empty(16)
    p = buf.data_ptr()
    return _best(lambda: memcpy(p, p, 0), 5, calls)


def calibrate(scale: float = 1.0, verbose: bool = False) -> HardwareProfile:
    """Measure now. scale=1 takes ~2-3 s on 2 cores; scale<1 shrinks sizes and repetitions (tests)."""
    t_start = time.perf_counter()
    load = _load_average()
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
        copy_bw = step("copy", lambda: _copy_bandwidth(big, reps))
        cache_bw = step("cache", lambda: _copy_bandwidth(min(4 * MB, max(llc // 8, 256 << 10)), reps))
        fresh_bw, fault_bw = step("fresh", lambda: _fresh_write(max(int(64 * MB * scale), 4 * MB), reps))
        gemm = {
            "float32": step("gemm32", lambda: _gemm_flops(torch.float32, 1024 if full else 256, 3 if full else 2)),
            "bfloat16": step("gemm16", lambda: _gemm_flops(torch.bfloat16, 2048 if full else 256, 3 if full else 2)),
            "int8": step("gemm8", lambda: _gemm_flops(torch.int8, 2048 if full else 256, 3 if full else 2)),
        }
        gemm = {k: v for k, v in gemm.items() if v > 0}
        gemm.setdefault("float32", 1e10)
        vec = step("vector", lambda: _vector_flops(1 << 16, reps))
        rates = step("transc", lambda: _transcendental_rates(1 << 16 if full else 1 << 14, reps))
        aten_oh = step("aten", lambda: _aten_overhead(2000 if full else 200))
        kern_oh = step("ctypes", lambda: _ctypes_overhead(5000 if full else 500))
    tr = len(rates) / sum(1.0 / r for r in rates.values())
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
        fresh_write_bandwidth=fresh_bw,
        measured=True,
        source=(f"calibrated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC in "
                f"{total:.2f} s, scale {scale:g}, torch {torch.__version__}"),
        key=machine_key(),
        calibration_load=load,
    )


# ----------------------------------------------------------------------------------------------
# the readable table
# ----------------------------------------------------------------------------------------------
def _si(x: float, unit: str) -> str:
    for f, p in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= f:
            return f"{x / f:.3g} {p}{unit}"
    return f"{x:.3g} {unit}"


def _time(s: float) -> str:
    return f"{s * 1e9:.0f} ns" if s < 1e-6 else f"{s * 1e6:.2f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def profile_rows(hw: HardwareProfile) -> list[tuple[str, str]]:
    rows = [
        ("name", hw.name),
        ("source", hw.source + ("" if hw.measured else "  [DATASHEET, not measured]")),
        ("copy bandwidth (DRAM, r+w)", _si(hw.copy_bandwidth, "B/s")),
        ("cache bandwidth (in LLC, r+w)", _si(hw.cache_bandwidth, "B/s")),
        ("last-level cache", f"{hw.llc_bytes / MB:.0f} MiB"),
    ]
    rows += [(f"GEMM {k}", _si(v, "FLOP/s")) for k, v in sorted(hw.gemm_flops.items())]
    rows += [
        ("vector (pointwise) FLOP/s", _si(hw.vector_flops, "FLOP/s")),
        ("transcendentals (harmonic mean)", _si(hw.transcendental_rate, "eval/s")),
    ]
    rows += [(f"  {k}", _si(v, "eval/s")) for k, v in sorted(hw.transcendental_rates.items())]
    rows += [
        ("ATen op call from Python", _time(hw.aten_overhead)),
        ("generated-kernel call (ctypes)", _time(hw.kernel_overhead)),
    ]
    if hw.launch_overhead:
        rows.append(("device kernel launch", _time(hw.launch_overhead)))
    if hw.fresh_write_bandwidth:
        rows.append(("fresh >=64 MB alloc + copy (r+w)", _si(hw.fresh_write_bandwidth, "B/s")))
    rows.append(("page-fault bandwidth (extra)",
                 _si(hw.page_fault_bandwidth, "B/s") if hw.page_fault_bandwidth else "not modelled"))
    if hw.calibration_load >= 0:
        rows.append(("load average when measured", f"{hw.calibration_load:.2f}"
                     + ("  (NOISY: re-measured when the machine is quiet)" if is_noisy(hw.calibration_load) else "")))
    rows.append(("key", hw.key or "-"))
    return rows


def format_profile(hw: HardwareProfile) -> str:
    rows = profile_rows(hw)
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m costmodel.calibrate", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the profile as JSON")
    ap.add_argument("--force", action="store_true", help="re-measure even if a stored profile exists")
    ap.add_argument("--cache-dir", default=None, help="default: $FUSION_CACHE_DIR or ~/.cache/fusion")
    ap.add_argument("--datasheet", metavar="NAME", default=None,
                    help="print a datasheet GPU profile instead (A100-40GB, H100-SXM, H200)")
    ap.add_argument("--verbose", action="store_true", help="print the time of each calibration step")
    args = ap.parse_args(argv)
    if args.datasheet:
        from costmodel.profiles import get_profile

        hw = get_profile(args.datasheet)
    elif args.verbose:
        hw = calibrate(verbose=True)
        save_profile(hw, profile_path(args.cache_dir))
        _MEMO.clear()
    else:
        hw = load_or_calibrate(args.cache_dir, force=args.force)
    if args.json:
        print(json.dumps(hw.to_json(), indent=2, sort_keys=True))
    else:
        print(format_profile(hw))
        if not args.datasheet:
            print(f"stored at    {profile_path(args.cache_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
