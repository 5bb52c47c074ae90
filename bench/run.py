"""Eager vs Inductor vs fusion (and, with --peers, Inductor with freezing, OpenVINO, ONNX Runtime), in one process.

    python -m bench.run                         # every case (micro + models)
    python -m bench.run --micro --only softmax,swiglu
    python -m bench.run --models --variants eager,inductor --json out.json --markdown
    python -m bench.run --models --peers        # + inductor_freezing, openvino, onnxruntime (bench/peers.py)

Per case and variant: warm-up, then the median of N calls timed with time.perf_counter (N adapts to
--budget seconds, at least --min-repeat), compile time = the first call of the compiled function,
relative error max|a-b|/max|b| against eager. Micro cases also report the achieved bandwidth: the
minimal bytes (inputs read once + output written once) / time, in GB/s and as a fraction of the
calibrated copy bandwidth (fusion.costmodel.profile_store.load_or_calibrate()).

torch.set_num_threads(--threads, default 2; ONNX Runtime's intra-op and OpenVINO's threads the same),
torch.no_grad(). Any variant may be absent or failing: its column then says "failed: ...". A
FusionFallbackWarning during compile marks the result "fallback" (it then ran the original graph). The
tables' headers name the CPU (/proc/cpuinfo) and the caches (cold with --cold, else warm).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings

if __package__ in (None, ""):                  # `python bench/run.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bench.cases import ALL, MICRO, MODELS, Case, min_bytes
from bench.peers import ALL as ALL_VARIANTS
from bench.peers import PEERS, SHORT, build_variant, caches_line, cpu_line
from bench.peers import short as _short

VARIANTS = ("eager", "inductor", "fusion")     # the default set; --peers adds PEERS


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the project's relative error)."""
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def bandwidth_figures(nbytes: float, seconds: float, copy_bw: float) -> dict:
    """GB/s and the fraction of the calibrated copy bandwidth (MBU) of `nbytes` moved in `seconds`:
    the same functions fusion.analyze uses for its MBU column (fusion.costmodel.hardware.mbu)."""
    from fusion.costmodel.hardware import achieved_bandwidth, mbu

    return {"gbps": achieved_bandwidth(nbytes, seconds) / 1e9, "frac_copy_bw": mbu(nbytes, seconds, copy_bw)}


def time_calls(f, inputs, warmup: int, budget_s: float, min_n: int, max_n: int, fixed_n: int | None):
    """(wall seconds of each timed call, mean process CPU seconds per call) after `warmup` calls; N = fixed_n or fits
    budget_s. CPU time (all threads) is a contention-robust companion to the wall time on a shared
    machine: with T threads fully busy, wall ~ cpu / T."""
    for _ in range(warmup):
        f(*inputs)
    if fixed_n:
        n = fixed_n
    else:
        t0 = time.perf_counter()
        f(*inputs)
        one = time.perf_counter() - t0
        n = max(min_n, min(max_n, int(budget_s / max(one, 1e-6))))
    times = []
    c0 = time.process_time()                  # tick-based on some kernels (4 ms): total over the loop
    for _ in range(n):
        t0 = time.perf_counter()
        f(*inputs)
        times.append(time.perf_counter() - t0)
    return times, (time.process_time() - c0) / n


def cpu_busy(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy over `interval` seconds (from /proc/stat; 0.0 where unavailable)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)
    try:
        t0, i0 = snap()
        time.sleep(interval)
        t1, i1 = snap()
        return 1.0 - (i1 - i0) / max(t1 - t0, 1)
    except (OSError, ValueError, IndexError):
        return 0.0


def wait_quiet(max_wait_s: float, busy_below: float = 0.2) -> float:
    """Wait (at most max_wait_s) until the other processes leave the CPUs idle; returns the busy fraction."""
    deadline = time.monotonic() + max_wait_s
    busy = cpu_busy()
    while busy >= busy_below and time.monotonic() < deadline:
        busy = cpu_busy(1.0)
    return busy


def predict(fn, inputs, hw) -> dict:
    """Cost-model predictions for a micro case: the unfused ATen graph (sum of per-node roofline times)
    and the whole graph as ONE fused kernel (kernel_cost), in seconds."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fusion.costmodel.roofline import graph_time, kernel_cost

    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    return {"pred_eager_s": graph_time(gm, hw), "pred_fused_s": kernel_cost(nodes).time(hw)}


def run_case(case: Case, variants, args, copy_bw: float, hw=None) -> dict:
    try:
        return _run_case(case, variants, args, copy_bw, hw)
    except Exception as e:                              # building the case or its eager reference failed
        if args.verbose:
            traceback.print_exc()
        return {"name": case.name, "kind": case.kind, "desc": case.desc,
                "results": {v: {"error": "case failed: " + _short(e)} for v in variants}}


def _run_case(case: Case, variants, args, copy_bw: float, hw=None) -> dict:
    fn, inputs = case.make()
    rec: dict = {"name": case.name, "kind": case.kind, "desc": case.desc, "results": {},
                 "load_before": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    with torch.no_grad():
        ref = fn(*inputs)
        mb = min_bytes(inputs, ref) if case.kind == "micro" else None
        rec["min_bytes"] = mb
        if case.kind == "micro" and hw is not None:
            try:
                rec.update(predict(fn, inputs, hw))
            except Exception as e:
                rec["pred_error"] = _short(e)
        micro = case.kind == "micro"
        for i, v in enumerate(variants):
            torch._dynamo.reset()
            if i:       # each variant its own model (make() is seeded: the same weights): fusion converts
                del fn, inputs      # weights in place (channels-last convolutions), which no peer may see
                gc.collect()
                fn, inputs = case.make()
            gc.collect()
            r: dict = {}
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    t0 = time.perf_counter()            # compile (export + session for onnxruntime) + first call
                    f, out = build_variant(fn, inputs, v, args.threads)
                    first = time.perf_counter() - t0
                fb = [str(w.message).splitlines()[0][:160] for w in caught
                      if "Fallback" in type(w.message).__name__ or "fall" in str(w.message).lower()]
                if v != "eager":
                    r["compile_s"] = first
                if fb and v == "fusion":
                    r["fallback"] = fb[0]
                r["rel_err"] = 0.0 if v == "eager" else rel_err(out, ref)
                times, cpu = time_calls(f, inputs, args.warmup, args.budget if micro else args.model_budget,
                                   args.min_repeat, args.max_repeat, args.repeat)
                med = statistics.median(times)
                q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), med, max(times)]
                r.update(median_s=med, min_s=min(times), max_s=max(times), n=len(times),
                         spread=(q[2] - q[0]) / med if med else 0.0, cpu_s=cpu)
                if mb:
                    r.update(bandwidth_figures(mb, med, copy_bw))
                if getattr(f, "exporter", None):
                    r["exporter"] = f.exporter
                del f, out
            except Exception as e:                     # any variant may fail; the others still run
                r = {"error": _short(e)}
                if args.verbose:
                    traceback.print_exc()
            rec["results"][v] = r
    del fn, inputs, ref
    torch._dynamo.reset()
    gc.collect()
    base = rec["results"]
    for other in ("eager", "inductor"):
        a, b = base.get("fusion", {}), base.get(other, {})
        if "median_s" in a and "median_s" in b:
            rec[f"fusion_over_{other}"] = a["median_s"] / b["median_s"]
    e, i = base.get("eager", {}), base.get("inductor", {})
    if "median_s" in e and "median_s" in i:
        rec["inductor_over_eager"] = i["median_s"] / e["median_s"]
    return rec


# ---------------------------------------------------------------------------------------------- output
def _ms(r: dict) -> str:
    if "error" in r:
        return "failed: " + r["error"]
    if "median_s" not in r:
        return "-"
    s = f"{r['median_s'] * 1e3:.2f}"
    s += " (torchscript export)" if r.get("exporter") == "torchscript" else ""
    return s + (" (fallback)" if r.get("fallback") else "")


def _ratio(rec: dict, key: str) -> str:
    x = rec.get(key)
    return f"{x:.2f} ({1 / x:.2f}x)" if x else "-"


def _bw(r: dict) -> str:
    if "gbps" not in r:
        return "-"
    f = r.get("frac_copy_bw")
    return f"{r['gbps']:.1f}" + (f" ({f * 100:.0f}%)" if f else "")


def _err(r: dict) -> str:
    return f"{r['rel_err']:.1e}" if "rel_err" in r else "-"


def _cs(r: dict) -> str:
    return f"{r['compile_s']:.1f}" if "compile_s" in r else "-"


def table_rows(records: list[dict], variants) -> tuple[list[str], list[list[str]]]:
    cols = ["case"] + [f"{v} ms" for v in variants]
    if "fusion" in variants:
        cols += ["fusion/eager", "fusion/inductor"]
    if "inductor" in variants and "eager" in variants:
        cols += ["inductor/eager"]
    cols += [f"compile {v} s" for v in variants if v != "eager"]
    cols += [f"err {v}" for v in variants if v != "eager"]
    if any(r["kind"] == "micro" for r in records):
        cols += [f"GB/s {v} (% copy)" for v in variants]
        cols += ["model eager/fused ms"]
    cols += ["cpu ms " + "/".join(SHORT.get(v, v) for v in variants), "spread %", "busy %"]
    rows = []
    for rec in records:
        res = rec["results"]
        row = [rec["name"]] + [_ms(res.get(v, {})) for v in variants]
        if "fusion" in variants:
            row += [_ratio(rec, "fusion_over_eager"), _ratio(rec, "fusion_over_inductor")]
        if "inductor" in variants and "eager" in variants:
            row += [_ratio(rec, "inductor_over_eager")]
        row += [_cs(res.get(v, {})) for v in variants if v != "eager"]
        row += [_err(res.get(v, {})) for v in variants if v != "eager"]
        if any(r["kind"] == "micro" for r in records):
            row += [_bw(res.get(v, {})) for v in variants]
            row += [f"{rec['pred_eager_s'] * 1e3:.2f} / {rec['pred_fused_s'] * 1e3:.2f}" if "pred_eager_s" in rec else "-"]
        spreads = [r["spread"] for r in res.values() if "spread" in r]
        row += ["/".join(f"{res[v]['cpu_s'] * 1e3:.1f}" if "cpu_s" in res.get(v, {}) else "-" for v in variants)]
        row += [f"{max(spreads) * 100:.0f}" if spreads else "-",
                f"{rec['cpu_busy_before'] * 100:.0f}" if rec.get("cpu_busy_before") is not None else "-"]
        rows.append(row)
    return cols, rows


def print_table(records, variants, title: str) -> None:
    cols, rows = table_rows(records, variants)
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title, show_lines=False)
        for c in cols:
            t.add_column(c, overflow="fold", justify="left" if c == "case" else "right")
        for r in rows:
            t.add_row(*r)
        Console(width=max(160, sum(len(c) + 3 for c in cols))).print(t)
    except ImportError:
        print(title)
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
        for r in rows:
            print("  ".join(x.rjust(w) for x, w in zip(r, widths)))


def markdown(records, variants, header: str) -> str:
    cols, rows = table_rows(records, variants)
    out = [header, "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(x.replace("|", "/") for x in r) + " |" for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    """The command line of `python -m bench.run`."""
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated case names: " + ",".join(ALL))
    ap.add_argument("--micro", action="store_true", help="micro cases only (with --models: both)")
    ap.add_argument("--models", action="store_true", help="model cases only (with --micro: both)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated subset of " + ",".join(ALL_VARIANTS) + " (default: eager,inductor,fusion)")
    ap.add_argument("--peers", action="store_true",
                    help="add the peers " + ",".join(PEERS) + " to --variants (pip install -e '.[bench]')")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=None, help="fixed number of timed calls")
    ap.add_argument("--min-repeat", type=int, default=5)
    ap.add_argument("--max-repeat", type=int, default=100)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timed calls per micro variant")
    ap.add_argument("--model-budget", type=float, default=3.0, help="seconds per model variant")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each case wait up to S seconds for the CPUs to be idle (shared machines)")
    ap.add_argument("--cold", action="store_true", help="disable Inductor's on-disk caches (cold compile times)")
    ap.add_argument("--json", metavar="PATH", default=None, help="write all results as JSON")
    ap.add_argument("--markdown", action="store_true", help="also print a Markdown table (BENCHMARKS.md)")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failing variants")
    return ap


def _selection(ap: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], list]:
    """(variants, cases) the arguments name; an unknown name is a usage error (exits)."""
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    variants += [p for p in PEERS if args.peers and p not in variants]
    bad = [v for v in variants if v not in ALL_VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {list(ALL_VARIANTS)}")
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in ALL]
        if unknown:
            ap.error(f"unknown case(s) {unknown}; known: {sorted(ALL)}")
        return variants, [ALL[n] for n in names]
    return variants, (MICRO if args.micro or not args.models else []) + (MODELS if args.models or not args.micro else [])


def _environment(args: argparse.Namespace, hw) -> str:
    """The one-line description of this run (torch, threads, profile, UTC time), printed with the load."""
    env = (f"torch {torch.__version__}, {args.threads} threads, {hw.name}, calibrated copy bandwidth "
           f"{hw.copy_bandwidth / 1e9:.1f} GB/s, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(env, flush=True)
    print(cpu_line(), flush=True)
    print(caches_line(args.cold), flush=True)
    if hasattr(os, "getloadavg"):
        print(f"load average at the start: {os.getloadavg()[0]:.2f} (2 cores: above ~1 the timings share the CPU)",
              flush=True)
    return env


def _run_cases(cases: list, variants: list[str], args: argparse.Namespace, hw) -> list[dict]:
    """Each case's record (`run_case`, plus how busy the CPUs were before it), one progress line each."""
    records = []
    for c in cases:
        busy = wait_quiet(args.wait_quiet) if args.wait_quiet else cpu_busy()
        t0 = time.perf_counter()
        rec = run_case(c, variants, args, hw.copy_bandwidth, hw)
        rec["cpu_busy_before"] = busy
        records.append(rec)
        took = time.perf_counter() - t0
        print(f"  {c.name}: " + ", ".join(f"{v} {_ms(rec['results'][v])}" for v in variants) + f"  [{took:.0f} s]",
              flush=True)
    return records


def _report(records: list[dict], variants: list[str], env: str, args: argparse.Namespace, hw) -> None:
    """The tables (micro, then models), the load legend, and with --markdown / --json those outputs too."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for kind, title in (("micro", "micro kernels (fp32), median ms"), ("model", "HF models (random weights), median ms")):
        sel = [r for r in records if r["kind"] == kind]
        if sel:
            print_table(sel, variants, title)
    if load is not None:
        print(f"load average at the end: {load:.2f}; 'spread %' = largest (p75 - p25) / median of the case's "
              "variants, 'busy %' = CPU use by other processes just before the case, 'cpu ms' = process CPU "
              "time per call (all threads; " + ", ".join(f"{SHORT[v]} = {v}" for v in variants) + ")")
    if args.markdown:
        for kind in ("micro", "model"):
            sel = [r for r in records if r["kind"] == kind]
            if sel:
                print()
                print(markdown(sel, variants, f"### {kind} ({env})\n\n{cpu_line()}\n\n{caches_line(args.cold)}"))
    if args.json:
        doc = {"env": env, "cpu": cpu_line(), "caches": caches_line(args.cold), "torch": torch.__version__,
               "threads": args.threads, "python": platform.python_version(), "profile": hw.to_json(),
               "load_average": load, "variants": variants, "cases": records}
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.json}")


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the selected cases, print (and with --json write) the results."""
    ap = _parser()
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cold:
        import torch._inductor.config as ic

        ic.force_disable_caches = True
    variants, cases = _selection(ap, args)

    from fusion.costmodel.profile_store import load_or_calibrate

    hw = load_or_calibrate()
    env = _environment(args, hw)
    records = _run_cases(cases, variants, args, hw)
    _report(records, variants, env, args, hw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
