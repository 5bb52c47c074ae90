"""Command line: `python -m fusion demo | optimize | explain | analyze | repro | bench | calibrate`.

MODEL, wherever a command takes one, is a built-in proxy workload (fusion/workloads.py: bert, gpt2,
llama) or `package.module:factory` (imported with the current directory on sys.path). The factory is
called with no arguments and returns either (model, example_inputs) or a model alone. For a model
alone the example inputs are the --input-shape tensors (float32 randn; `1x128:int64` for token ids),
else `model.example_inputs` (a tuple, or a method returning one), else for a Hugging Face model
(`model.config.vocab_size`) random token ids of shape 1x128.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

MODEL_HELP = ("built-in workload (bert, gpt2, llama) or package.module:factory, where factory() returns "
              "(model, example_inputs) or a model (see --input-shape)")
EPILOG = __doc__.split("\n\n", 1)[1]


def _parser(cmd: str, description: str, model: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m fusion {cmd}", description=description, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if model:
        p.add_argument("model", help=MODEL_HELP)
        p.add_argument("--input-shape", action="append", metavar="SHAPE[:DTYPE]",
                       help="an example input for a factory that returns a model alone, e.g. 4x128x768 or "
                            "1x128:int64 (repeat for several inputs)")
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="show the pass being run on stderr (default: when stderr is a terminal)")
    return p


def _parse_shape(spec: str):
    import torch

    shape, _, dtype = spec.partition(":")
    dims = [int(d) for d in shape.lower().split("x") if d]
    dt = getattr(torch, dtype or "float32", None)
    if not isinstance(dt, torch.dtype):
        raise SystemExit(f"--input-shape {spec!r}: unknown dtype {dtype!r}")
    if dt.is_floating_point:
        return torch.randn(dims, dtype=dt)
    return torch.randint(0, 100, dims, dtype=dt)


def load_model(spec: str, input_shapes: list[str] | None = None):
    """(model in eval mode, example inputs as a tuple) for MODEL (see the module docstring)."""
    import torch

    from fusion.workloads.blocks import WORKLOADS

    if spec in WORKLOADS:
        make, inputs = WORKLOADS[spec]
        return make().eval(), inputs()
    if ":" not in spec:
        raise SystemExit(f"unknown model {spec!r}: use one of {sorted(WORKLOADS)} or package.module:factory")
    import importlib

    mod, _, fn = spec.partition(":")
    sys.path.insert(0, ".")
    try:
        factory = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"cannot load {spec}: {type(e).__name__}: {e}") from None
    made = factory()
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        model, inputs = made
    elif isinstance(made, torch.nn.Module):
        model, inputs = made, None
    else:
        raise SystemExit(f"{spec}() must return (model, example_inputs) or a torch.nn.Module, "
                         f"got {type(made).__name__}")
    if input_shapes:
        inputs = tuple(_parse_shape(s) for s in input_shapes)
    elif inputs is None:
        ex = getattr(model, "example_inputs", None)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if ex is not None:
            inputs = ex() if callable(ex) else ex
        elif isinstance(vocab, int):
            inputs = (torch.randint(0, vocab, (1, 128)),)
        else:
            raise SystemExit(f"{spec}() returned a model alone: give its inputs with --input-shape "
                             "(e.g. --input-shape 4x128x768), or return (model, example_inputs)")
    return model.eval(), inputs if isinstance(inputs, tuple) else (inputs,)


def _check_plot_options(a: argparse.Namespace, *flags: str) -> None:
    """FusionInputError "--FLAG needs matplotlib: pip install ..." for the first plot option given while
    matplotlib is missing, before minutes of work whose plot could not be drawn."""
    from fusion.analysis.plots import require_matplotlib

    for flag in flags:
        if getattr(a, flag.lstrip("-").replace("-", "_")):
            require_matplotlib(f"{flag} needs")


def _display(a: argparse.Namespace, title: str):
    from fusion import progress

    on = a.progress if a.progress is not None else sys.stderr.isatty()
    return progress.display(on, title)


def _optimize(a: argparse.Namespace, verb: str = "optimize"):
    """(model, inputs, optimized module), showing the passes when asked."""
    import fusion
    from fusion import progress

    model, inputs = load_model(a.model, a.input_shape)
    with _display(a, f"{verb} {a.model}"):
        progress.stage("capture")
        opt = fusion.optimize(model, inputs)
    return model, inputs, opt


def _bench_rows(name: str, model, args, variants: list[str], explain: bool = False) -> str:
    """One row: median time per variant (eager, inductor, fusion), speed-ups, compile times, error."""
    import torch

    import fusion
    from fusion.analysis.comparison import median_time

    with torch.no_grad():
        ref = model(*args)
    t, comp, err = {}, {}, "-"
    for v in variants:
        torch._dynamo.reset()
        t0 = time.perf_counter()
        f = model if v == "eager" else torch.compile(model) if v == "inductor" else fusion.optimize(model, args)
        with torch.no_grad():
            out = f(*args)
        comp[v] = time.perf_counter() - t0
        if v == "fusion":
            err = f"{((out - ref).abs().max() / ref.abs().max()).item():.1e}"
            if explain:
                print(f.explain())
        t[v] = median_time(f, args, 10, warmup=2)
    cols = [f"{name[:12]:<12}"]
    cols += [f"{t[v] * 1e3:>7.2f}ms" if v in t else f"{'-':>9}" for v in ("eager", "inductor", "fusion")]
    fus = t.get("fusion")
    cols += [f"{t['eager'] / fus:>8.2f}x" if fus and "eager" in t else f"{'-':>9}",
             f"{t['inductor'] / fus:>10.2f}x" if fus and "inductor" in t else f"{'-':>11}"]
    cols += [f"{comp[v]:>11.1f}s" if v in comp else f"{'-':>12}" for v in ("inductor", "fusion")]
    return " ".join(cols + [f"{err:>8}"])


BENCH_HEAD = (f"{'model':<12} {'eager':>9} {'inductor':>9} {'fusion':>9} {'vs eager':>9} {'vs inductor':>11} "
              f"{'compile ind.':>12} {'compile fus.':>12} {'rel err':>8}")


def demo(argv: list[str]) -> int:
    """Eager vs Inductor vs fusion on the built-in transformer blocks, in one process."""
    import torch

    from fusion.workloads.blocks import WORKLOADS

    p = _parser("demo", demo.__doc__, model=False)
    p.add_argument("--workload", choices=sorted(WORKLOADS), action="append")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--explain", action="store_true", help="print what the optimizer did")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", category=FutureWarning)
    print(f"fusion demo: fp32, CPU, {a.threads} threads; median of 10 calls after warm-up\n")
    print(BENCH_HEAD)
    for name in a.workload or sorted(WORKLOADS):
        make, inputs = WORKLOADS[name]
        print(_bench_rows(name, make().eval(), inputs(), ["eager", "inductor", "fusion"], a.explain), flush=True)
    return 0


def optimize(argv: list[str]) -> int:
    """Optimize MODEL; print what was done, the kernel report and a before/after table."""
    p = _parser("optimize", optimize.__doc__)
    p.add_argument("--save", metavar="DIR", help="save the optimized program (fusion.load(DIR) reloads it)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    p.add_argument("--no-compare", action="store_true", help="skip the measured before/after comparison")
    p.add_argument("--plot", metavar="PNG", help="write a roofline plot of every call, before and after")
    a = p.parse_args(argv)
    _check_plot_options(a, "--plot")
    import fusion

    _, inputs, opt = _optimize(a)
    cmp = None
    if not a.no_compare and opt.captured is not None:
        with _display(a, f"compare {a.model}"):
            cmp = fusion.compare(opt, inputs)
        if a.plot:
            cmp.roofline_plot(a.plot, title=f"{a.model}: roofline before and after fusion")
    saved = str(opt.save(a.save)) if a.save else None
    if a.json:
        graphs = [{"label": g.log.label, "nodes": g.log.num_nodes, "fired": g.log.fired,
                   "passes": [{"name": r.name, "seconds": r.seconds, "ok": r.ok, "detail": r.detail}
                              for r in g.log.passes],
                   "fallbacks": g.log.fallbacks} for g in opt.graphs]
        doc = {"model": a.model, "capture": {"method": opt.capture_method, "seconds": opt.capture_seconds},
               "graphs": graphs, "kernels": opt.report(print_table=False),
               "comparison": cmp.to_dict() if cmp else None, "saved": saved}
        print(json.dumps(doc, indent=1, default=str))
        return 0
    print(opt.explain())
    opt.report()
    if cmp is not None:
        print()
        print(cmp.table())
    if cmp is not None and a.plot:
        print("wrote", a.plot)
    if saved:
        print(f"\nsaved to {saved} (fusion.load({saved!r}))")
    return 0


def explain(argv: list[str]) -> int:
    """What the optimizer did to MODEL (passes, rules, kernels, fallbacks), kernel report."""
    a = _parser("explain", explain.__doc__).parse_args(argv)
    _, _, opt = _optimize(a, "explain")
    print(opt.explain())
    opt.report()
    return 0


def analyze(argv: list[str]) -> int:
    """Per-node FLOPs, bytes, time, MBU; memory and KV cache; roofline and memory plots."""
    import fusion
    from fusion import progress

    p = _parser("analyze", analyze.__doc__)
    p.add_argument("--top", type=int, default=25, help="rows of the node table")
    p.add_argument("--plot", metavar="PNG", help="write a roofline plot here")
    p.add_argument("--memory-plot", metavar="PNG",
                   help="write memory (weights, activations, KV cache) vs sequence length here")
    p.add_argument("--batch", type=int, default=1, help="batch of the memory figures (default 1)")
    p.add_argument("--seqs", help="sequence lengths of the memory figures, e.g. 128,512,2048")
    p.add_argument("--no-measure", action="store_true", help="predictions only (do not run the model)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    a = p.parse_args(argv)
    _check_plot_options(a, "--plot", "--memory-plot")
    model, inputs = load_model(a.model, a.input_shape)
    seqs = [int(s) for s in a.seqs.split(",")] if a.seqs else None
    with _display(a, f"analyze {a.model}"):
        an = fusion.analyze(model, inputs, measure=not a.no_measure)
        mem = []
        if seqs or a.memory_plot:
            progress.stage("memory at other sequence lengths")
            mem = [an.memory(a.batch, s) for s in (seqs or [an.seq or 128])]
            if a.memory_plot:
                an.memory_plot(a.memory_plot, batch=a.batch, seqs=seqs,
                               title=f"{a.model}: memory vs sequence length, batch {a.batch}")
        if a.plot:
            an.roofline_plot(a.plot, title=f"{a.model}: roofline")
    if a.json:
        print(json.dumps(dict(an.to_dict(), memory=mem), indent=1, default=str))
        return 0
    print(an.table(top=a.top))
    from fusion.analysis.memory import fmt_bytes

    for m in mem:
        print(f"batch {m['batch']} x seq {m['seq']}: weights {fmt_bytes(m['weights'])}, activations "
              f"{fmt_bytes(m['activations'])}, KV cache {fmt_bytes(m['kv_cache'])}, total {fmt_bytes(m['total'])}")
    for path in (a.plot, a.memory_plot):
        if path:
            print("wrote", path)
    return 0


def repro(argv: list[str]) -> int:
    """`dump MODEL FILE`: a weight-free reproducer; `replay FILE`: run it again."""
    import fusion
    from fusion.store import repro as rp

    p = argparse.ArgumentParser(prog="python -m fusion repro")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="optimize a model and write its weight-free reproducer")
    d.add_argument("model", help=MODEL_HELP)
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


def _bench_suite():
    """bench/run.py's main; FusionInputError when bench/ is not importable (an installed fusion: the suite
    lives in the source checkout, next to fusion/)."""
    from fusion.errors import FusionInputError

    try:
        from bench.run import main as bench_main
    except ModuleNotFoundError as e:
        if e.name not in ("bench", "bench.run"):
            raise                    # bench/ is there but lacks a dependency: the traceback names it
        raise FusionInputError("bench without MODEL runs the suite bench/run.py: run it from a source "
                               "checkout of fusion (python -m fusion bench MODEL works anywhere)") from None
    return bench_main


def bench(argv: list[str]) -> int:
    """`bench MODEL`: eager vs Inductor vs fusion on MODEL; `bench [options]`: bench/run.py."""
    if not argv or argv[0].startswith("-"):
        bench_main = _bench_suite()
        if "-h" in argv or "--help" in argv:
            print("python -m fusion bench MODEL [--variants ...]: one model (python -m fusion bench bert --help);\n"
                  "python -m fusion bench [options]: the benchmark suite, bench/run.py:\n")
        return bench_main(argv) or 0
    import torch

    p = _parser("bench", bench.__doc__)
    p.add_argument("--variants", default="eager,inductor,fusion", help="subset of eager,inductor,fusion")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    if set(variants) - {"eager", "inductor", "fusion"}:
        p.error(f"unknown variants in {a.variants!r}")
    torch.set_num_threads(a.threads)
    model, inputs = load_model(a.model, a.input_shape)
    print(f"fp32, CPU, {a.threads} threads; median of 10 calls after warm-up\n")
    print(BENCH_HEAD)
    with _display(a, f"bench {a.model}"):
        row = _bench_rows(a.model.rpartition(":")[2] or a.model, model, inputs, variants)
    print(row)
    return 0


def calibrate(argv: list[str]) -> int:
    """Measure this machine (bandwidth, GEMM, transcendentals, overheads) for the cost model."""
    from fusion.costmodel.profile_store import main as calibrate_main

    return calibrate_main(argv) or 0


def cache_cmd(argv: list[str]) -> int:
    """Show (info) or empty (clear) the cache directory; it is kept under its size limit by itself."""
    from fusion.store import bounded
    from fusion.store import cache

    ap = argparse.ArgumentParser(prog="python -m fusion cache", description=cache_cmd.__doc__)
    ap.add_argument("action", choices=["info", "clear"])
    ap.add_argument("--dir", help="the cache directory (default: $FUSION_CACHE_DIR or ~/.cache/fusion)")
    ap.add_argument("--all", action="store_true", help="clear: the calibrated hardware profiles too")
    a = ap.parse_args(argv)
    root = cache.cache_dir(a.dir)
    if a.action == "clear":
        n = bounded.clear(root, everything=a.all)
        print(f"{root}: removed {n} files" + ("" if a.all else " (calibrated profiles kept; --all removes them)"))
        return 0
    use = bounded.usage(root)
    total = sum(b for _, b in use.values())
    limit = bounded.limit_bytes()
    print(f"{root}: {total / 2**20:.1f} MB of {limit / 2**20:.0f} MB (limit: $FUSION_CACHE_LIMIT_MB or "
          f"Config.cache_limit_mb; least recently used entries are evicted past it)")
    for name, (n, b) in sorted(use.items()):
        print(f"  {name:<10} {n:>6} entries {b / 2**20:>9.1f} MB")
    return 0


COMMANDS = {"demo": demo, "optimize": optimize, "explain": explain, "analyze": analyze, "repro": repro,
            "bench": bench, "calibrate": calibrate, "cache": cache_cmd}


#: torch.export's run_decompositions deep-copies the module call graph, whose pytree specs hold the deprecated
#: LeafSpec; copying one warns (torch 2.13, inside torch), once per capture. No user can act on it.
TORCH_INTERNAL_WARNINGS = [(r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)]


def _usage(asked: bool) -> int:
    """The command list and MODEL's forms -> exit status: on stdout and 0 when asked for (--help), else on
    stderr and 2 (no command, or an unknown one)."""
    out = sys.stdout if asked else sys.stderr
    print(f"usage: python -m fusion {{{'|'.join(COMMANDS)}}} [options]\n"
          "       python -m fusion COMMAND --help\n", file=out)
    for name, fn in COMMANDS.items():
        print(f"  {name:<10} {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}", file=out)
    print("\n" + EPILOG, file=out)
    return 0 if asked else 2


def main(argv: list[str] | None = None) -> int:
    """Run one command (argv: sys.argv[1:] by default) -> exit status. A FusionInputError (a missing extra,
    a model that cannot take its inputs) ends as one line "fusion: ..." on stderr and status 2."""
    from fusion.errors import FusionInputError

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        return _usage(asked=argv[:1] in (["-h"], ["--help"]))
    with warnings.catch_warnings():     # only for this command: main() may be called from Python
        for message, category in TORCH_INTERNAL_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        try:
            return COMMANDS[argv[0]](argv[1:])
        except FusionInputError as e:
            print(f"fusion: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
