"""Plots of analyses: the roofline (calls as points under the machine's roofs). Needs the `plot` extra;
without it `_pyplot` / `require_matplotlib` raise FusionInputError with the line to install it."""
from __future__ import annotations

import math
from typing import Any

from fusion.errors import FusionInputError


#: what to install for any plot: the `plot` extra
INSTALL_PLOT = "pip install 'fusion[plot]'"


def require_matplotlib(what: str = "plots need") -> None:
    """Nothing when matplotlib imports; else FusionInputError "<what> matplotlib: pip install ..." (the CLI
    checks each plot option this way before any work, naming the option: "--plot needs")."""
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        raise FusionInputError(f"{what} matplotlib: {INSTALL_PLOT}") from None


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend; FusionInputError with the install line without it."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roofline_plot(path: str, hw: Any, series: list[tuple[str, list, str]], title: str) -> str:
    """Points (intensity, FLOP/s: measured when there is a time, else predicted) of each series under the
    roofs min(peak GEMM FLOP/s, copy bandwidth x intensity); one marker style per series."""
    plt = _pyplot()
    peak = hw.gemm_flops["float32"]
    bw = hw.copy_bandwidth
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ints = [s.intensity for _, stats, _ in series for s in stats if s.flops > 0 and s.bytes > 0]
    lo = math.floor(math.log10(min(ints + [0.1]) / 2))
    hi = math.ceil(math.log10(max(ints + [10 * peak / bw]) * 2))
    xs = [10 ** (i / 10) for i in range(10 * lo, 10 * hi + 1)]
    ax.plot(xs, [min(peak, bw * x) for x in xs], "k-", lw=1.2,
            label=f"roof: {bw / 1e9:.0f} GB/s copy, {peak / 1e9:.0f} GFLOP/s GEMM")
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    for i, (name, stats, marker) in enumerate(series):
        pts = [s for s in stats if s.flops > 0 and s.bytes > 0]
        if not pts:
            continue
        measured = all(s.measured_s for s in pts)
        fused = sum(1 for s in pts if s.kind == "kernel")
        ax.scatter([s.intensity for s in pts], [s.flops / (s.measured_s or s.predicted_s) for s in pts],
                   s=[40 if s.kind == "kernel" else 18 for s in pts], marker=marker, alpha=0.75,
                   color=colors[i % len(colors)], edgecolors="k", linewidths=0.4,
                   label=f"{name}: {len(pts)} calls ({'measured' if measured else 'predicted'})"
                   + (f", {fused} fused kernels (large)" if fused else ""))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("performance (FLOP / s)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
