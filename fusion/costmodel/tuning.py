"""Measured choices: what the roofline cannot settle, timed on the real shapes once and remembered.

The speed of an opaque library call (an fp32 GEMM on MKL or on oneDNN, bmm, attention) depends on the
library's code path for this CPU and this shape: on a Zen 5 MKL's sgemm takes an AVX2 path and oneDNN is
~2x faster; on a Zen 4 MKL wins at a 1024^2 square and loses 1.4x at BERT's 512x768 by 768x3072. So no
constant or global switch decides such a choice: each candidate is timed on the product's own shape at
compile time (alternating, best of a few rounds, within a time budget), and the result is kept in a
persistent tuning cache, shared by every process and model on the machine:

    times = tuning.fastest("linear", key, candidates, config)     # {candidate: seconds}, measured or cached
    winner = min(times, key=times.get)

Entries live in <cache>/tuning/<cpu identity>/<op>-<hash of key>.json (one file per entry: concurrent
processes never merge a file, and a partial write is never seen: fusion.store.cache writes atomically and
checksums). The CPU identity holds the vendor, family, model, the flags, the thread count and the torch and
oneDNN versions: another CPU, thread count or library build never reads this machine's answers.

A record can also be written by hand (`record`): tests fake a CPU where MKL wins and one where oneDNN
wins, and the same code must pick each measured winner.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fusion.store import cache

#: operand bytes a measurement may allocate: above it the product is timed on a proxy with fewer output
#: columns (the per-FLOP rate of a GEMM that large no longer depends on N), so measuring never adds more
#: than this to the peak memory of an optimize (seed 000: weights stay the only big allocation)
MAX_MEASURE_BYTES = 48 << 20
#: rounds of the alternating measurement (each candidate once per round, best kept)
ROUNDS = 3


def _cpuinfo() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break                         # the first processor is enough
                k, _, v = line.partition(":")
                out[k.strip()] = v.strip()
    except OSError:
        pass
    return out


def onednn_version() -> str:
    for line in torch.__config__.show().splitlines():
        if "MKL-DNN" in line or "oneDNN" in line:
            return line.strip(" -")
    return "none"


def cpu_identity(threads: int | None = None) -> dict[str, str]:
    """What decides a library's code path: the CPU (vendor, family, model, flags), the threads, the builds."""
    info = _cpuinfo()
    flags = " ".join(sorted(info.get("flags", "").split()))
    return {
        "vendor": info.get("vendor_id", "?"), "family": info.get("cpu family", "?"), "model": info.get("model", "?"),
        "model_name": info.get("model name", "?"),
        "flags": hashlib.sha256(flags.encode()).hexdigest()[:12],
        "threads": str(threads if threads is not None else torch.get_num_threads()),
        "torch": torch.__version__, "onednn": onednn_version(),
    }


def identity_key(threads: int | None = None) -> str:
    ident = cpu_identity(threads)
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"{ident['vendor']}-{ident['family']}-{ident['model']}-{ident['threads']}thr-{digest}"


def _entry_path(op: str, key: str, cache_dir: str | None) -> Any:
    h = hashlib.sha256(key.encode()).hexdigest()[:24]
    return cache.subdir(os.path.join("tuning", identity_key()), cache_dir) / f"{op}-{h}.json"


def lookup(op: str, key: str, cache_dir: str | None = None) -> dict[str, float] | None:
    """The stored times of `op` at `key` on this machine, or None."""
    hit = cache.read_json(_entry_path(op, key, cache_dir))
    if not isinstance(hit, dict) or hit.get("key") != key or not isinstance(hit.get("times"), dict):
        return None
    return {k: float(v) for k, v in hit["times"].items()}


def record(op: str, key: str, times: dict[str, float], cache_dir: str | None = None, how: str = "measured") -> None:
    """Store the times of `op`'s candidates at `key` for this machine (atomic; never raises on a full disk)."""
    try:
        cache.write_json(_entry_path(op, key, cache_dir), {"op": op, "key": key, "times": times, "how": how,
                                                           "when": time.strftime("%Y-%m-%d %H:%M:%S")})
    except OSError:
        pass


def measure(candidates: dict[str, Callable[[], Any]], rounds: int = ROUNDS) -> dict[str, float]:
    """Best seconds per call of each candidate: one warm-up call each, then `rounds` rounds that call every
    candidate once in turn (alternating, so a change of load or clock hits all of them alike)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    best = {name: float("inf") for name in candidates}
    with unset_fake_temporarily(), torch.no_grad():   # inside torch.compile: real tensors
        for fn in candidates.values():
            fn()
        for _ in range(rounds):
            for name, fn in candidates.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


@dataclass
class Budget:
    """Seconds of measuring one optimize may spend; a choice past it keeps the profile's prediction."""

    seconds: float
    spent: float = 0.0
    measured: list[str] = field(default_factory=list)

    def allows(self, predicted_s: float) -> bool:
        return self.spent + predicted_s <= self.seconds


def fastest(op: str, key: str, make: Callable[[], dict[str, Callable[[], Any]]], cache_dir: str | None,
            budget: Budget | None, predicted_s: float = 0.0, scale: float = 1.0) -> dict[str, float] | None:
    """{candidate: seconds} of `op` at `key`: from the tuning cache, else measured now (`make` builds the
    candidates, allocating their operands) when the budget allows the predicted cost of measuring, and
    stored. `scale`: the measured candidates do 1/scale of the work at `key` (a proxy), so their times are
    multiplied by it. None when there is no record and no budget left."""
    times = lookup(op, key, cache_dir)
    if times is not None:
        return times
    if budget is None or not budget.allows(predicted_s):
        return None
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    t0 = time.perf_counter()
    with unset_fake_temporarily():   # inside torch.compile a fake mode is active: the operands must be real
        candidates = make()
    times = {name: t * scale for name, t in measure(candidates).items()}
    budget.spent += time.perf_counter() - t0
    budget.measured.append(f"{op} {key}")
    record(op, key, times, cache_dir)
    return times
