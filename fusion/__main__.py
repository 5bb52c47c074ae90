"""Command line: `python -m fusion demo | explain | analyze | repro | bench | calibrate`."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings


def _median_time(fn, args, n: int = 10) -> float:
    import torch

    with torch.no_grad():
        for _ in range(2):
            fn(*args)
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn(*args)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def demo(argv: list[str]) -> int:
    """Eager vs Inductor vs fusion on the built-in transformer blocks, side by side in one process."""
    import torch

    import fusion
    from fusion.workloads import WORKLOADS

    p = argparse.ArgumentParser(prog="python -m fusion demo")
    p.add_argument("--workload", choices=sorted(WORKLOADS), action="append")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--explain", action="store_true", help="print what the optimizer did")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", category=FutureWarning)
    print(f"fusion demo: fp32, CPU, {a.threads} threads; median of 10 calls after warm-up\n")
    print(f"{'workload':<8} {'eager':>9} {'inductor':>9} {'fusion':>9} {'vs eager':>9} {'vs inductor':>12} "
          f"{'compile ind.':>12} {'compile fus.':>12} {'rel err':>8}")
    for name in a.workload or sorted(WORKLOADS):
        make, inputs = WORKLOADS[name]
        model, args = make().eval(), inputs()
        with torch.no_grad():
            ref = model(*args)
        torch._dynamo.reset()
        t0 = time.perf_counter()
        ind = torch.compile(model)
        with torch.no_grad():
            ind(*args)
        c_ind = time.perf_counter() - t0
        t0 = time.perf_counter()
        opt = fusion.optimize(model, args)
        with torch.no_grad():
            out = opt(*args)
        c_fus = time.perf_counter() - t0
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        te, ti, tf = (_median_time(f, args) for f in (model, ind, opt))
        print(f"{name:<8} {te*1e3:>7.2f}ms {ti*1e3:>7.2f}ms {tf*1e3:>7.2f}ms {te/tf:>8.2f}x {ti/tf:>11.2f}x "
              f"{c_ind:>11.1f}s {c_fus:>11.1f}s {err:>8.1e}")
        if a.explain:
            print(opt.explain())
    return 0


def load_model(spec: str):
    """A built-in workload name, or `package.module:factory` where factory() returns (model, example_inputs)."""
    from fusion.workloads import WORKLOADS

    if spec in WORKLOADS:
        make, inputs = WORKLOADS[spec]
        return make().eval(), inputs()
    if ":" not in spec:
        raise SystemExit(f"unknown model {spec!r}: use one of {sorted(WORKLOADS)} or package.module:factory")
    import importlib

    mod, _, fn = spec.partition(":")
    sys.path.insert(0, ".")
    made = getattr(importlib.import_module(mod), fn)()
    if not (isinstance(made, tuple) and len(made) == 2):
        raise SystemExit(f"{spec}() must return (model, example_inputs)")
    model, inputs = made
    return model.eval(), inputs if isinstance(inputs, tuple) else (inputs,)


def explain(argv: list[str]) -> int:
    import fusion

    p = argparse.ArgumentParser(prog="python -m fusion explain")
    p.add_argument("model", help="built-in workload (bert, llama) or package.module:factory")
    a = p.parse_args(argv)
    model, inputs = load_model(a.model)
    opt = fusion.optimize(model, inputs)
    print(opt.explain())
    opt.report()
    return 0


def analyze(argv: list[str]) -> int:
    import json

    import fusion

    p = argparse.ArgumentParser(prog="python -m fusion analyze")
    p.add_argument("model", help="built-in workload (bert, llama) or package.module:factory")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--plot", help="write a roofline plot (PNG) here")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.parse_args(argv)
    model, inputs = load_model(a.model)
    an = fusion.analyze(model, inputs)
    if a.json:
        print(json.dumps({"totals": an.totals, "weight_bytes": an.weight_bytes,
                          "peak_activation_bytes": an.peak_activation_bytes,
                          "nodes": [s.__dict__ for s in an.nodes]}, indent=1, default=str))
    else:
        print(an.table(top=a.top))
    if a.plot:
        print("wrote", an.roofline_plot(a.plot, title=f"{a.model}: roofline"))
    return 0


def repro(argv: list[str]) -> int:
    import fusion
    from fusion import repro as rp

    p = argparse.ArgumentParser(prog="python -m fusion repro")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="optimize a model and write its weight-free reproducer")
    d.add_argument("model")
    d.add_argument("path")
    r = sub.add_parser("replay", help="replay a reproducer with random weights")
    r.add_argument("path")
    a = p.parse_args(argv)
    if a.cmd == "dump":
        model, inputs = load_model(a.model)
        path = rp.dump(fusion.optimize(model, inputs), a.path)
        print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KB)")
        return 0
    result = rp.replay(a.path)
    print(result)
    return 0 if result.same_decisions and result.max_rel_error <= 1e-4 else 1


def bench(argv: list[str]) -> int:
    from bench.run import main as bench_main

    return bench_main(argv) or 0


def calibrate(argv: list[str]) -> int:
    from costmodel.calibrate import main as calibrate_main

    return calibrate_main(argv) or 0


COMMANDS = {"demo": demo, "explain": explain, "analyze": analyze, "repro": repro, "bench": bench,
            "calibrate": calibrate}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m fusion {{{'|'.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
