"""The profile store: this machine's calibrated profile, measured once, kept as JSON, reloaded afterwards.

    current_profile(cache_dir=None) -> HardwareProfile      # = load_or_calibrate(cache_dir)
    load_or_calibrate(cache_dir=None, force=False) -> HardwareProfile
    python -m fusion calibrate [--json] [--force] [--cache-dir D] [--datasheet NAME]

Profiles live under <cache>/profiles/<machine key>.json (fusion.store.cache's directory); the measuring
is `fusion.costmodel.calibrate`.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from fusion.costmodel import calibrate as calibration
from fusion.costmodel.calibrate import SCHEMA
from fusion.costmodel import hardware
from fusion.costmodel.hardware import ONEDNN_KEY, HardwareProfile, machine_key
from fusion.store.cache import atomic_write, cache_dir as _cache_dir, exclusive

MB = 1 << 20
_MEMO: dict[str, HardwareProfile] = {}


def cache_root(cache_dir: str | None = None) -> Path:
    return _cache_dir(cache_dir)


def profile_path(cache_dir: str | None = None) -> Path:
    return cache_root(cache_dir) / "profiles" / f"{machine_key()}.json"


def profile_from_json(d: dict) -> HardwareProfile:
    names = {f.name for f in dataclasses.fields(HardwareProfile)}
    return HardwareProfile(**{k: v for k, v in d.items() if k in names})


def save_profile(hw: HardwareProfile, path: Path) -> None:
    """`hw` as indented JSON at `path`, written atomically (fusion.store.cache.atomic_write). Every dir
    created on the way gets mode 0o700."""
    for d in reversed([path.parent, *path.parent.parents]):    # every dir we create gets 0o700
        if not d.exists():
            d.mkdir(mode=0o700, exist_ok=True)
    atomic_write(path, json.dumps(hw.to_json(), indent=2, sort_keys=True).encode())


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
        view_overhead=lo(a.view_overhead, b.view_overhead),
        graph_call_overhead=lo(a.graph_call_overhead, b.graph_call_overhead),
        parallel_overhead=lo(a.parallel_overhead, b.parallel_overhead),
        gemm_curve=_merge_curves(a.gemm_curve, b.gemm_curve),
        kernel_rates={k: (b.kernel_rates.get(k, a.kernel_rates.get(k)) if k == "overlap" else
                          hi(a.kernel_rates.get(k, 0.0), b.kernel_rates.get(k, 0.0)))
                      for k in {*a.kernel_rates, *b.kernel_rates}},
        fresh_write_bandwidth=hi(a.fresh_write_bandwidth, b.fresh_write_bandwidth),
        calibration_load=min((x for x in (a.calibration_load, b.calibration_load) if x >= 0), default=-1.0),
        source=b.source + " (merged with an earlier calibration: best of both)",
    )


def _merge_curves(a: dict, b: dict) -> dict:
    """Per dtype and size (FLOPs) the larger FLOP/s of two gemm_curves."""
    out = {}
    for k in {*a, *b}:
        pts: dict[float, float] = {}
        for f, r in [*a.get(k, []), *b.get(k, [])]:
            pts[f] = max(pts.get(f, 0.0), r)
        out[k] = [[f, r] for f, r in sorted(pts.items())]
    return out


def load_or_calibrate(cache_dir: str | None = None, *, force: bool = False, scale: float = 1.0,
                      cpu_clock: bool = False) -> HardwareProfile:
    """The calibrated profile of this machine: from <cache>/profiles/<machine-key>.json when present and
    valid, else measured now (<= ~3 s) and stored. `force` re-measures; `scale` < 1 shrinks the sizes
    (tests). An unwritable cache dir only costs the re-measurement next time (never an error).

    A stored profile measured on a busy machine (calibration_load high) is kept and reported as noisy;
    `force` re-measures it. cpu_clock: measure (if measuring) with the
    process CPU clock (one thread only; see calibrate)."""
    measure = (lambda: calibration.calibrate(scale=scale, cpu_clock=True)) if cpu_clock else (lambda: calibration.calibrate(scale=scale))
    path = profile_path(cache_dir)
    memo_key = f"{path}|{scale}"
    if not force and memo_key in _MEMO:
        return _MEMO[memo_key]
    hw = None if force else _stored(path)
    # A profile measured on a busy machine is kept (its load is recorded and reported): re-measuring
    # behind the user's back would put a 256 MB, multi-second measurement inside some later compile.
    # `python -m fusion calibrate --force` re-measures on purpose.
    if hw is None:
        with exclusive(path):     # processes starting together on a new machine: one measures, all use it
            hw = None if force else _stored(path)
            if hw is None:
                hw = measure()
                try:
                    save_profile(hw, path)
                except OSError as e:                   # read-only home etc.: keep the in-memory profile
                    print(f"costmodel: could not store the profile at {path}: {e}", file=sys.stderr)
    elif ONEDNN_KEY not in hw.gemm_flops:              # a profile from before the GEMM-library choice:
        ratio = calibration._onednn_over_mkl(512, 3)               # measure the ratio now, scale the stored MKL rate
        if ratio:
            rate = ratio * hw.gemm_flops.get("float32", 0.0)
            hw = dataclasses.replace(hw, gemm_flops={**hw.gemm_flops, ONEDNN_KEY: rate})
            try:
                save_profile(hw, path)
            except OSError:
                pass
    _MEMO[memo_key] = hw
    return hw


def _stored(path: Path) -> HardwareProfile | None:
    """The profile stored at `path` when it is this machine's and usable, else None (measure it)."""
    if not path.is_file():
        return None
    try:
        hw = profile_from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None                                    # corrupt or from an older schema: re-measure
    if hw.key and hw.key != machine_key():
        return None
    if hw.schema < SCHEMA and not hardware.is_noisy(hardware.load_average()):
        return None                                    # older schema: re-measure, but only on a quiet machine
    return hw


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
    rows += [(f"  {k}" + ("" if k in ("exp", "erf", "tanh") else " (inside the ATen op)"), _si(v, "eval/s"))
             for k, v in sorted(hw.transcendental_rates.items())]
    rows += [(f"generated kernels: {k}", f"{v:.2f}" if k == "overlap" else
              _si(v, "FLOP/s" if k == "flops" else "B/s" if "bandwidth" in k else "eval/s"))
             for k, v in sorted(hw.kernel_rates.items())]
    rows += [
        ("ATen op call from Python", _time(hw.aten_overhead)),
        ("generated-kernel call (wrapper + ctypes)", _time(hw.kernel_overhead)),
        ("view-op call from Python", _time(hw.view_overhead)),
        ("FX GraphModule call", _time(hw.graph_call_overhead)),
        ("OpenMP parallel region (fork/join)", _time(hw.parallel_overhead)),
    ]
    for k, pts in sorted(hw.gemm_curve.items()):
        rows.append((f"GEMM {k} small sizes", ", ".join(
            f"n={round((f / 2) ** (1 / 3))}: {_si(r, 'FLOP/s')}" for f, r in pts)))
    if hw.launch_overhead:
        rows.append(("device kernel launch", _time(hw.launch_overhead)))
    if hw.fresh_write_bandwidth:
        rows.append(("fresh >=64 MB alloc + copy (r+w)", _si(hw.fresh_write_bandwidth, "B/s")))
    rows.append(("page-fault bandwidth (extra)",
                 _si(hw.page_fault_bandwidth, "B/s") if hw.page_fault_bandwidth else "not modelled"))
    if hw.calibration_load >= 0:
        rows.append(("load average when measured", f"{hw.calibration_load:.2f}"
                     + ("  (NOISY: re-measure with --force on a quiet machine)" if hardware.is_noisy(hw.calibration_load) else "")))
    rows.append(("key", hw.key or "-"))
    return rows


def format_profile(hw: HardwareProfile) -> str:
    rows = profile_rows(hw)
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fusion calibrate", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the profile as JSON")
    ap.add_argument("--force", action="store_true", help="re-measure even if a stored profile exists")
    ap.add_argument("--cache-dir", default=None, help="default: $FUSION_CACHE_DIR or ~/.cache/fusion")
    ap.add_argument("--datasheet", metavar="NAME", default=None,
                    help="print a datasheet GPU profile instead (A100-40GB, H100-SXM, H200)")
    ap.add_argument("--verbose", action="store_true", help="print the time of each calibration step")
    ap.add_argument("--threads", type=int, default=None, help="torch threads to calibrate for (default: torch's)")
    ap.add_argument("--cpu-clock", action="store_true",
                    help="measure with the process CPU clock (needs --threads 1): robust to other processes")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.datasheet:
        from fusion.costmodel.datasheets import get_profile

        hw = get_profile(args.datasheet)
    elif args.verbose or args.cpu_clock:
        hw = calibration.calibrate(verbose=args.verbose, cpu_clock=args.cpu_clock)
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


def current_profile(cache_dir: str | None = None) -> HardwareProfile:
    """The calibrated profile of this machine (measured on first use, then read from disk)."""
    return load_or_calibrate(cache_dir)
