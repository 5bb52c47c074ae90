"""Command line: `python -m fusion demo | explain | calibrate`."""
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


def explain(argv: list[str]) -> int:
    import fusion
    from fusion.workloads import WORKLOADS

    p = argparse.ArgumentParser(prog="python -m fusion explain")
    p.add_argument("workload", choices=sorted(WORKLOADS))
    a = p.parse_args(argv)
    make, inputs = WORKLOADS[a.workload]
    opt = fusion.optimize(make().eval(), inputs())
    print(opt.explain())
    opt.report()
    return 0


def calibrate(argv: list[str]) -> int:
    from costmodel.calibrate import main as calibrate_main

    return calibrate_main(argv) or 0


COMMANDS = {"demo": demo, "explain": explain, "calibrate": calibrate}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m fusion {{{'|'.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
