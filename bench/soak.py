"""Soak: thousands of compiles of varying shapes in one process keep memory flat and the cache under its limit.

    python -m bench.soak --compiles 2000 --limit-mb 64 [--cache-dir D]

Each compile optimizes a small block (Linear, GELU, LayerNorm, residual) at another (batch, width), so every
one captures, rewrites, lowers and builds a new kernel library, then drops the program. Printed: RSS after
the first 50 compiles (the process's working set: imports, pools, the e-graph engine) and at the end, their
difference, and the cache directory's size against its limit. Exit status 1 when RSS grew by more than
--max-growth-mb (default 100) or the directory ended above its limit.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

WARMUP = 50


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Block(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.lin = torch.nn.Linear(n, n)
        self.norm = torch.nn.LayerNorm(n)

    def forward(self, x):
        return self.norm(x + torch.nn.functional.gelu(self.lin(x)))


def main(argv: list[str] | None = None) -> int:
    import fusion
    from fusion.store import bounded

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compiles", type=int, default=2000)
    ap.add_argument("--limit-mb", type=float, default=64.0)
    ap.add_argument("--max-growth-mb", type=float, default=100.0)
    ap.add_argument("--cache-dir", default=None, help="default: a fresh temporary directory")
    a = ap.parse_args(argv)
    cache_dir = a.cache_dir or tempfile.mkdtemp(prefix="fusion-soak-")
    cfg = fusion.Config(cache_dir=cache_dir, cache_limit_mb=a.limit_mb, tune=False)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    base = None
    peak_dir = 0
    for i in range(a.compiles):
        n, batch = 8 + 8 * (i % 61), 1 + (i // 61) % 33          # 2013 distinct (width, batch) pairs
        m = Block(n).eval()
        x = torch.randn(batch, n)
        opt = fusion.optimize(m, (x,), config=cfg)
        with torch.no_grad():
            err = float(((opt(x) - m(x)).abs().max() / m(x).abs().max()))
        if err > 1e-4:
            print(f"compile {i}: relative error {err:.2e}", file=sys.stderr)
            return 1
        del opt, m, x
        if i + 1 == WARMUP:
            gc.collect()
            base = rss_mb()
        if (i + 1) % 100 == 0:
            gc.collect()
            size = sum(b for _, b in bounded.usage(Path(cache_dir)).values())
            peak_dir = max(peak_dir, size)
            print(f"{i + 1:>5} compiles  {time.perf_counter() - t0:7.1f} s  RSS {rss_mb():7.1f} MB  "
                  f"cache {size / 2**20:6.1f} MB", flush=True)
    gc.collect()
    end = rss_mb()
    size = sum(b for _, b in bounded.usage(Path(cache_dir)).values())
    limit = bounded.limit_bytes(a.limit_mb)
    growth = end - (base if base is not None else end)
    print(f"RSS after {WARMUP} compiles {base:.1f} MB, after {a.compiles}: {end:.1f} MB (growth {growth:+.1f} MB); "
          f"cache {size / 2**20:.1f} MB (largest seen {peak_dir / 2**20:.1f}) of a {a.limit_mb:g} MB limit; "
          f"{time.perf_counter() - t0:.0f} s")
    return 0 if growth <= a.max_growth_mb and size <= limit else 1


if __name__ == "__main__":
    sys.exit(main())
