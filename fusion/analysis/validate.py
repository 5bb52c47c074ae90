"""Validate the cost model: predicted vs measured time of whole programs, in one run.

    python -m fusion.analysis.validate [--quick] [--plot PATH] [--json PATH] [--reps N] [--threads 2] [--cpu-clock]
    validate(quick=False) -> ValidationResult(rows, spearman, median_rel_err)

On a quiet machine: `python -m fusion.costmodel.calibrate --force` first (a fresh 2-thread profile), then this.
On a busy one, 2-thread wall-clock timings are dominated by OpenMP threads waiting for the CPU; the
load-robust check is `--threads 1 --cpu-clock` (process CPU time, 1-thread profile measured likewise).

Programs: the micro set (`fusion.workloads.micro`: hand-written softmax, RMSNorm, layer norm, gelu(x+b)+r,
silu(g)*a, masked scaled softmax) at three shapes each, and the transformer blocks of `fusion.workloads.blocks` (BertBlock,
LlamaBlock) at a small and a medium size. Each program runs three ways:

    eager    the captured ATen graph, every node an ATen call          predicted: program_time(source_gm)
    aten     rewritten by the e-graph (fused ops), not lowered          (= fusion.Config(codegen="aten"))
    lowered  fusion.optimize default: generated C++ kernels + ATen      predicted: kernels + remaining nodes

All three are predicted with the same `program_time` (one model), from the calibrated profile of this
machine. Measured: median of the per-call time of interleaved batches (the three ways of one program
alternate, so a burst of load from other processes hits all three alike) after a warm-up, with
torch.set_num_threads(2) and no_grad. Reported: a table, Spearman rank correlation (scipy), median
|pred - meas| / meas, the 1-minute load average before/after, and optionally a log-log scatter PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from fusion.costmodel.hardware import HardwareProfile
from fusion.costmodel.program_cost import graph_program_time
from fusion.workloads.micro import MICRO, FunctionModule, dims

WAYS = ("eager", "aten", "lowered")


@dataclass
class Row:
    family: str            # softmax, rmsnorm, ..., bert, llama
    program: str           # family + shape
    way: str               # eager | aten | lowered
    predicted_s: float
    measured_s: float
    measured_min_s: float = 0.0   # fastest batch: the least load-sensitive estimate on a busy machine
    kernels: int = 0       # generated kernels in the program (lowered only)
    aten_calls: int = 0    # non-view ATen calls in the program

    @property
    def ratio(self) -> float:
        return self.predicted_s / self.measured_s if self.measured_s > 0 else float("nan")

    @property
    def rel_err(self) -> float:
        return abs(self.predicted_s - self.measured_s) / self.measured_s if self.measured_s > 0 else float("nan")


@dataclass
class ValidationResult:
    rows: list[Row]
    spearman: float
    median_rel_err: float
    load_before: float = -1.0
    load_after: float = -1.0
    spearman_min: float = float("nan")       # the same statistics against the fastest batch
    median_rel_err_min: float = float("nan")
    profile: dict = field(default_factory=dict)
    seconds: float = 0.0
    threads: int = 2
    clock: str = "wall"

    def to_json(self) -> dict:
        return {"spearman": self.spearman, "median_rel_err": self.median_rel_err,
                "spearman_min": self.spearman_min, "median_rel_err_min": self.median_rel_err_min,
                "load_before": self.load_before, "load_after": self.load_after, "seconds": self.seconds,
                "threads": self.threads, "clock": self.clock,
                "profile": self.profile,
                "rows": [{**asdict(r), "ratio": r.ratio, "rel_err": r.rel_err} for r in self.rows]}


# ---------------------------------------------------------------------------------------------- programs
#: validate's family names (its rows, fusion/costmodel/README.md's table) -> the shared micro case
#: (fusion.workloads.micro) each one runs
FAMILIES = {"softmax": "softmax", "rmsnorm": "rmsnorm", "layernorm": "layernorm_hand",
            "gelu_bias_res": "gelu_bias_res", "swiglu": "swiglu", "masked_softmax": "attn_softmax"}


def _micro(family: str, shape: tuple, seed: int = 0):
    """(name, family, make) of the shared micro case behind `family` at main shape `shape`."""
    case = MICRO[FAMILIES[family]]

    def make():
        return FunctionModule(case.fn), case.inputs(shape, torch.Generator().manual_seed(seed))
    return f"{family} {dims(shape)}", family, make


def _block(family: str, size: str):
    from fusion.workloads.blocks import BertBlock, LlamaBlock, bert_block_inputs

    def make():
        torch.manual_seed(0)
        if family == "bert":
            d, h, f, b, s = (256, 4, 1024, 2, 64) if size == "small" else (768, 12, 3072, 4, 128)
            return BertBlock(d, h, f).eval(), bert_block_inputs(b, s, d)
        d, h, f, b, s = (256, 4, 704, 2, 64) if size == "small" else (512, 8, 1408, 4, 128)
        return LlamaBlock(d, h, f).eval(), (torch.randn(b, s, d),)
    return f"{family} {size}", family, make


def programs(quick: bool = False) -> list[tuple[str, str, Callable]]:
    """(name, family, make) for every program; make() -> (module, inputs)."""
    if quick:
        return [_micro("softmax", (256, 1024)), _micro("rmsnorm", (2048, 1024)),
                _micro("gelu_bias_res", (256, 1024)), _micro("swiglu", (1024, 1024))]
    out = []
    for fam in FAMILIES:
        shapes = [(8, 12, 128, 128), (8, 12, 256, 256), (4, 16, 512, 512)] if fam == "masked_softmax" \
            else [(1024, 1024), (4096, 1024), (8192, 1024)]
        out += [_micro(fam, s) for s in shapes]
    out += [_block(f, s) for f in ("bert", "llama") for s in ("small", "medium")]
    return out


# ---------------------------------------------------------------------------------------------- measure
def _load() -> float:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return -1.0


def measure_interleaved(fns: list[Callable], reps: int = 15, min_batch_s: float = 2e-3,
                        budget_s: float = 4.0, clock: Callable[[], float] = time.perf_counter
                        ) -> list[tuple[float, float]]:
    """(median, min) seconds per call of each fn: after a warm-up, `reps` rounds; in each round every fn
    runs one batch (enough calls to last ~min_batch_s), in turn, so the fns see the same load."""
    inner = []
    for fn in fns:
        fn(); fn()                                           # warm-up: caches, pools, lazy init
        t0 = clock()
        fn()
        one = max(clock() - t0, 1e-7)
        inner.append(max(1, min(200, int(min_batch_s / one))))
    samples: list[list[float]] = [[] for _ in fns]
    deadline = time.perf_counter() + budget_s
    for r in range(reps):
        for i, fn in enumerate(fns):
            t0 = clock()
            for _ in range(inner[i]):
                fn()
            samples[i].append((clock() - t0) / inner[i])
        if r >= 4 and time.perf_counter() > deadline:
            break
    return [(statistics.median(s), min(s)) for s in samples]


# ---------------------------------------------------------------------------------------------- run
def _count_calls(gm) -> int:
    from fusion.costmodel.roofline import is_view_node
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and not is_view_node(n))


def run_program(name: str, family: str, make: Callable, hw: HardwareProfile, reps: int,
                clock: Callable[[], float] = time.perf_counter) -> list[Row]:
    from fusion.api import optimize

    model, inputs = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimize(model, inputs)
    if not opt.graphs:
        return []
    g = opt.graphs[0]
    flat = opt.flat_args(*inputs)
    gms = {"eager": g.source_gm, "aten": g.program_gm, "lowered": g.gm}
    kernels = {k.name: k for k in g.log.kernels}
    preds = {way: graph_program_time(gm, hw, kernels, g.program_gm) for way, gm in gms.items()}

    def runner(gm):
        return lambda: gm(*flat)

    with torch.no_grad():
        meas = measure_interleaved([runner(gms[w]) for w in WAYS], reps=reps, clock=clock)
    rows = []
    for way, (med, fastest) in zip(WAYS, meas):
        gm = gms[way]
        nk = sum(1 for n in gm.graph.nodes if n.op == "call_module")
        rows.append(Row(family, name, way, preds[way], med, fastest, nk, _count_calls(gm)))
    return rows


def validate(quick: bool = False, reps: int | None = None, hw: HardwareProfile | None = None,
             verbose: bool = False, threads: int = 2, cpu_clock: bool = False) -> ValidationResult:
    """Predict and measure every program variant; Spearman rank correlation and median relative error.
    `threads`: torch threads while measuring (2: this machine's cores); the profile is the one calibrated
    for that thread count (its machine key includes it). cpu_clock (threads=1 only): measure the process
    CPU time instead of wall time, which other processes on a busy machine cannot inflate."""
    if cpu_clock and threads != 1:
        raise ValueError("cpu_clock needs threads=1 (CPU time adds up the threads)")
    clock = time.process_time if cpu_clock else time.perf_counter
    from scipy.stats import spearmanr

    from fusion.costmodel.profile_store import load_or_calibrate

    t_start = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        hw = hw or load_or_calibrate(cpu_clock=cpu_clock)
        load0 = _load()
        rows: list[Row] = []
        for name, family, make in programs(quick):
            try:
                got = run_program(name, family, make, hw, reps or (7 if quick else 15), clock)
            except Exception as e:                           # one broken program must not hide the rest
                print(f"validate: {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            rows += got
            if verbose:
                for r in got:
                    print(format_row(r), flush=True)
        load1 = _load()
    finally:
        torch.set_num_threads(old_threads)
    pred = [r.predicted_s for r in rows]

    def stats(meas):
        if len(rows) < 3:
            return float("nan"), float("nan")
        rho = float(spearmanr(pred, meas).statistic)
        return rho, statistics.median(abs(p - m) / m for p, m in zip(pred, meas))

    rho, med = stats([r.measured_s for r in rows])
    rho_min, med_min = stats([r.measured_min_s for r in rows])
    return ValidationResult(rows, rho, med, load0, load1, rho_min, med_min, hw.to_json(),
                            time.perf_counter() - t_start, threads, "cpu" if cpu_clock else "wall")


# ---------------------------------------------------------------------------------------------- output
def _t(s: float) -> str:
    return f"{s * 1e6:9.1f} us" if s < 1e-3 else f"{s * 1e3:9.3f} ms"


HEADER = (f"{'program':<28} {'way':<8} {'predicted':>12} {'measured':>12} {'ratio':>6} {'fastest':>12} "
          f"{'kern':>4} {'aten':>4}")


def format_row(r: Row) -> str:
    return (f"{r.program:<28} {r.way:<8} {_t(r.predicted_s):>12} {_t(r.measured_s):>12} {r.ratio:6.2f} "
            f"{_t(r.measured_min_s):>12} {r.kernels:>4} {r.aten_calls:>4}")


def format_table(res: ValidationResult) -> str:
    lines = [HEADER, "-" * len(HEADER)] + [format_row(r) for r in res.rows]
    lines += ["", f"variants: {len(res.rows)}   Spearman rho = {res.spearman:.3f}   "
              f"median |pred - meas| / meas = {res.median_rel_err * 100:.1f} %   "
              f"load avg {res.load_before:.2f} -> {res.load_after:.2f} (2 CPUs)   {res.threads} thread(s), "
              f"{res.clock} clock   {res.seconds:.0f} s",
              f"against the fastest batch instead of the median: Spearman {res.spearman_min:.3f}, "
              f"median rel. err {res.median_rel_err_min * 100:.1f} %"]
    return "\n".join(lines)


def plot(res: ValidationResult, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 7))
    fams = sorted({r.family for r in res.rows})
    markers = {"eager": "o", "aten": "s", "lowered": "^"}
    cmap = plt.get_cmap("tab10")
    for i, fam in enumerate(fams):
        for way, mk in markers.items():
            rs = [r for r in res.rows if r.family == fam and r.way == way]
            if rs:
                ax.scatter([r.measured_s * 1e3 for r in rs], [r.predicted_s * 1e3 for r in rs], marker=mk,
                           color=cmap(i % 10), s=40, alpha=0.85, edgecolors="k", linewidths=0.4,
                           label=f"{fam} / {way}" if way == "eager" else None)
    allv = [v * 1e3 for r in res.rows for v in (r.measured_s, r.predicted_s) if v > 0]
    lo, hi = min(allv) / 1.5, max(allv) * 1.5
    ax.plot([lo, hi], [lo, hi], "k-", lw=1, label="y = x")
    ax.plot([lo, hi], [lo * 1.3, hi * 1.3], "k:", lw=0.8, label="±30 %")
    ax.plot([lo, hi], [lo / 1.3, hi / 1.3], "k:", lw=0.8)
    for way, mk in markers.items():
        ax.scatter([], [], marker=mk, color="w", edgecolors="k", label=f"marker: {way}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured time per call [ms] (median)")
    ax.set_ylabel("predicted time per call [ms] (cost model)")
    ax.set_title(f"cost model vs measurement: {len(res.rows)} variants, Spearman {res.spearman:.2f}, "
                 f"median rel. err {res.median_rel_err * 100:.0f} %\n({res.threads} thread(s), {res.clock} clock, "
                 f"load avg {res.load_before:.1f} on 2 CPUs)",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusion.analysis.validate", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few small programs (tests, < 60 s)")
    ap.add_argument("--plot", metavar="PATH", help="write a predicted-vs-measured log-log scatter PNG")
    ap.add_argument("--json", metavar="PATH", help="write rows and summary as JSON")
    ap.add_argument("--reps", type=int, default=None, help="measurement rounds per program (default 15, quick 7)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--cpu-clock", action="store_true",
                    help="time with the process CPU clock (needs --threads 1): robust on a busy machine")
    ap.add_argument("-v", "--verbose", action="store_true", help="print rows as they are measured")
    args = ap.parse_args(argv)
    res = validate(quick=args.quick, reps=args.reps, verbose=args.verbose, threads=args.threads,
                   cpu_clock=args.cpu_clock)
    print(format_table(res))
    if args.plot:
        plot(res, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res.to_json(), f, indent=2)
        print(f"json: {args.json}")
    ok = res.spearman >= 0.8 and res.median_rel_err <= 0.30
    print("targets (Spearman >= 0.8, median rel. err <= 30 %): " + ("met" if ok else "NOT met"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
