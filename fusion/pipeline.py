"""The compiler, top to bottom: a table of named passes, each a graph in and a `PassResult` (graph + info) out.

    normalize    ATen graph        -> fusion dialect                 capture.normalize
    rewrite      fusion dialect    -> fusion dialect, fused ops      rewrite.rewrite: e-graph, saturate, extract
    approximate  fused ops         -> int8 / bf16 / ReLU attention   approx (opt-in, guarded on the inputs)
    merge        matmuls sharing an input -> one GEMM + split        passes.merge (where the cost model says so)
    prepare      clean-ups that pay off only with kernels             passes.prepare
    lower        graph             -> kernel plan (IR + call specs)  lower.plan_kernels (schedule, kernel IR)
    build        kernel plan       -> kernels bound into the graph   backends.<cpp|triton>.build + lower.bind_kernels
    gemm         fp32 CPU products -> the GEMM library measured fastest  passes.gemm

Every pass may fail on a graph we have never seen. Then the pass is skipped with ONE warning naming the
stage and the error, and the program runs on what the previous pass produced (ultimately the original
ATen graph), so an internal failure never changes results and never crashes the user's program.
"""
from __future__ import annotations

import time
import traceback
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Union

import torch.fx as fx

from fusion import progress
from fusion.capture import normalize
from fusion.config import Config
from fusion.errors import warn_fallback
from fusion.passes.prepare import prepare


GraphOrBuilder = Union[fx.GraphModule, Callable[[], fx.GraphModule]]


@dataclass
class PassRecord:
    name: str
    seconds: float
    ok: bool
    detail: str = ""


@dataclass
class CompileLog:
    """What happened to one graph: pass timings, rules fired, kernels made, fallbacks taken."""

    label: str
    num_nodes: int = 0
    passes: list[PassRecord] = field(default_factory=list)
    fired: dict[str, list[str]] = field(default_factory=dict)
    rewrite_stats: dict = field(default_factory=dict)
    kernels: list = field(default_factory=list)       # lower.KernelInfo
    fallbacks: list[str] = field(default_factory=list)
    approx: Any = None                                   # fusion.approx.ApproxResult when approximations ran
    backend: str = ""                                    # the backend that built the kernels (fusion.backends)
    onednn_gemms: int = 0                                # fp32 GEMMs moved to oneDNN (fusion/passes/gemm.py)
    gemm_tuning: dict = field(default_factory=dict)      # products timed at compile time (fusion/costmodel/tuning.py)
    attention_forms: dict = field(default_factory=dict)  # {"sdpa": n, "decomposed": m} (fusion/passes/attention.py)
    layout: dict = field(default_factory=dict)           # convolutions' layout and its measured times (passes/layout.py)
    coverage: list = field(default_factory=list)         # softmax/norm/... sites, fused or not (analysis/coverage.py)

    def run(self, name: str, fn: Callable[..., Any], *args: Any, config: Config, fallback: Any) -> Any:
        progress.stage(name)
        t0 = time.perf_counter()
        try:
            out = fn(*args)
        except BaseException as e:  # noqa: BLE001 - any internal failure (even a Rust panic) falls back, by design
            if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                raise
            dt = time.perf_counter() - t0
            detail = f"{type(e).__name__}: {e}"
            self.passes.append(PassRecord(name, dt, False, detail))
            self.fallbacks.append(f"{name}: {detail}")
            if not config.fallback:
                raise
            if config.verbose:
                traceback.print_exc()
            warn_fallback(name, detail.splitlines()[0][:300], what_runs=f"the {self.label} graph runs without it")
            return fallback
        self.passes.append(PassRecord(name, time.perf_counter() - t0, True))
        if config.verbose:
            print(f"[fusion] {self.label}: {name} {self.passes[-1].seconds * 1e3:.1f} ms")
        return out

    def record(self, info: dict) -> None:
        """Merge what a pass reports into the log: dicts (rules fired, stats) merge, the rest replaces."""
        for k, v in info.items():
            old = getattr(self, k)
            setattr(self, k, {**old, **v} if isinstance(old, dict) and isinstance(v, dict) else v)

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.passes)


class CompiledGraph:
    """The callable a compiled graph becomes: the lowered GraphModule plus what was done to it.

    If the lowered program raises at run time (a case the lowering did not foresee), it warns once and
    from then on runs the graph as it was before lowering.

    The graphs other than `gm` may be given as zero-argument functions that build them: a program loaded
    from a cache or a saved directory rebuilds its unlowered graphs only if they are needed (a fallback,
    explain, a reproducer), not on the way to its first call.
    """

    _boxed_call = False

    def __init__(self, gm: fx.GraphModule, fallback_gm: GraphOrBuilder, log: CompileLog, config: Config,
                 program_gm: GraphOrBuilder | None = None, source_gm: GraphOrBuilder | None = None):
        self.gm = gm
        self._graphs = {
            "fallback": fallback_gm,
            "program": program_gm if program_gm is not None else fallback_gm,  # after rewriting, before lowering
            "source": source_gm if source_gm is not None else fallback_gm,     # the captured graph, normalized
        }
        self.log = log
        self.config = config
        self._failed = False
        self._rewrite_failed = False

    def _graph(self, which: str) -> fx.GraphModule:
        g = self._graphs[which]
        if not isinstance(g, fx.GraphModule):
            built = g()
            for k, v in self._graphs.items():  # one builder shared by several roles builds once
                if v is g:
                    self._graphs[k] = built
            g = built
        return g

    @property
    def fallback_gm(self) -> fx.GraphModule:
        return self._graph("fallback")

    @property
    def program_gm(self) -> fx.GraphModule:
        return self._graph("program")

    @property
    def source_gm(self) -> fx.GraphModule:
        return self._graph("source")

    def __call__(self, *args: Any) -> Any:
        if not self._failed:
            try:
                return self.gm(*args)
            except Exception as e:  # noqa: BLE001
                if not self.config.fallback or self.gm is self.fallback_gm:
                    raise
                self._failed = True
                self.log.fallbacks.append(f"run: {type(e).__name__}: {e}")
                warn_fallback("run", f"{type(e).__name__}: {e}"[:300], what_runs="the unfused graph runs from now on")
        if not self._rewrite_failed:
            try:
                return self.fallback_gm(*args)
            except Exception as e:  # noqa: BLE001 - the rewritten graph itself is wrong: run the captured one
                if self.fallback_gm is self.source_gm:
                    raise
                self._rewrite_failed = True
                self.log.fallbacks.append(f"run (rewritten graph): {type(e).__name__}: {e}")
                warn_fallback("run", f"the rewritten graph raised {type(e).__name__}: {e}"[:300],
                              what_runs="the captured graph, as it was before rewriting, runs from now on")
        return self.source_gm(*args)

    @property
    def code(self) -> str:
        return self.gm.code


@dataclass
class PassResult:
    """What every pass returns: the graph it made (None: unchanged) and what it did (merged into the log)."""

    gm: fx.GraphModule | None = None
    info: dict = field(default_factory=dict)


@dataclass
class Context:
    """What the passes read besides the graph, and the graphs the driver keeps as fallbacks."""

    config: Config
    hw: Any
    log: CompileLog
    weights: dict | None = None
    example_args: list | None = None
    stackable: frozenset[str] | None = None
    hold_weights: bool = False
    original: fx.GraphModule | None = None     # the captured graph (after approximate: the converted one)
    rewritten: fx.GraphModule | None = None    # the program before lowering: the run-time fallback
    unprepared: fx.GraphModule | None = None   # before prepare: kept when lowering makes no kernel
    plan: Any = None                           # lower.KernelPlan, from lower to build
    backend: Any = None                        # backends.Backend, chosen by lower
    tuner: Any = None                          # passes.gemm.GemmTuner: measured GEMM times (merge, gemm)
    inference: bool = False                    # an inference graph (no autograd): layouts may change

    def gemm_tuner(self) -> Any:
        """The graph's GEMM tuner (one budget for merge and gemm); None with Config(tune=False)."""
        if self.tuner is None and self.config.tune:
            from fusion.passes.gemm import GemmTuner

            self.tuner = GemmTuner(self.config.cache_dir, self.config.tune_budget_s)
        return self.tuner


def normalize_pass(gm: fx.GraphModule, ctx: Context) -> PassResult:
    return PassResult(normalize(gm))


def rewrite_pass(gm: fx.GraphModule, ctx: Context) -> PassResult:
    exact = ctx.config
    if "relu_attention" in exact.approximate:  # keep softmax visible to the approximate rule
        exact = exact.replace(disable_rules=exact.disable_rules | {"attention"})
    result = _rewrite(gm, exact, ctx.hw)
    try:  # which softmax / norm / activation / attention sites fused: a report, never a reason to fall back
        from fusion.analysis.coverage import coverage_records

        sites = coverage_records(result.gm if result.gm is not None else gm, gm, result.stats.get("offered", ()))
    except Exception:  # noqa: BLE001
        sites = []
    return PassResult(result.gm, {"fired": result.fired, "rewrite_stats": result.stats, "coverage": sites})


def approximate_pass(gm: fx.GraphModule, ctx: Context) -> PassResult:
    approx = _approximate(gm, ctx.config, ctx.weights, ctx.example_args, ctx.hold_weights)
    if approx is None:
        _check_exact_fallback(ctx.weights)
        return PassResult()
    # weights are now int8/bf16 in place: the exact graphs are no longer valid fallbacks
    ctx.original = approx.gm
    return PassResult(approx.gm, {"approx": approx})


def merge_pass(gm: fx.GraphModule, ctx: Context) -> PassResult:
    merged = _merge(gm, ctx.hw, ctx.stackable, ctx.gemm_tuner())
    info: dict = {"fired": merged.fired} if merged.fired else {}
    if merged.decisions:
        info["rewrite_stats"] = {"shared_matmul": merged.decisions}
    return PassResult(merged.gm if merged.fired else None, info)


def layout_pass(gm: fx.GraphModule, ctx: Context) -> PassResult:
    from fusion.passes.layout import channels_last

    tuner = ctx.gemm_tuner()                      # convolution nets channels-last where measured faster
    out, info = channels_last(gm, ctx.config.cache_dir, tuner.budget, ctx.hw)
    return PassResult(out if out is not gm else None, {"layout": info} if info else {})


def prepare_pass(gm: fx.GraphModule, ctx: Context) -> PassResult:
    ctx.unprepared = gm
    return PassResult(prepare(gm))


def lower_pass(gm: fx.GraphModule, ctx: Context) -> PassResult:
    from fusion import backends, lower  # here, so that a broken or missing stage is a fallback, not an import error

    ctx.backend = backends.choose(gm, ctx.config)
    ctx.plan = lower.plan_kernels(gm, ctx.backend.devices(ctx.config), ctx.hw if ctx.backend.costed else None)
    return PassResult(None, {"backend": ctx.backend.name})


def build_pass(gm: fx.GraphModule, ctx: Context) -> PassResult:
    from fusion import lower

    plan = ctx.plan
    if not plan.irs:
        return PassResult(ctx.unprepared)
    lowered = lower.bind_kernels(plan, ctx.backend.build(plan.irs, plan.specs, ctx.config))
    return PassResult(lowered.gm, {"kernels": lowered.kernels})


def gemm_pass(gm: fx.GraphModule, ctx: Context) -> PassResult:
    from fusion.passes.gemm import lower_stacked_linears, use_onednn_gemms

    tuner = ctx.gemm_tuner()                      # each product on the library measured fastest at its shape
    gm, _ = lower_stacked_linears(gm, ctx.hw, tuner)   # merged shared-input products (fusion/dialect/stacked.py)
    gm, moved = use_onednn_gemms(gm, ctx.hw, tuner)    # a new module when it changes anything
    info: dict = {"onednn_gemms": moved}
    if tuner is not None:
        info["gemm_tuning"] = {"measured": len(tuner.budget.measured), "seconds": round(tuner.budget.spent, 3)}
    return PassResult(gm, info)


def attention_pass(gm: fx.GraphModule, ctx: Context) -> PassResult:
    from fusion.passes.attention import AttentionTuner, choose_attention

    gemm = ctx.gemm_tuner()                       # one measuring budget for the graph's library choices
    tuner = AttentionTuner(ctx.config.cache_dir, gemm.budget) if gemm is not None else None
    gm, counts = choose_attention(gm, tuner)      # each call on the form measured faster at its shape
    return PassResult(gm, {"attention_forms": counts} if any(counts.values()) else {})


def _approximating(ctx: Context) -> bool:
    return bool(ctx.config.approximate) and ctx.weights is not None and ctx.example_args is not None


def _merging(ctx: Context) -> bool:
    return bool(ctx.stackable) and ctx.hw is not None and "shared_matmul" not in ctx.config.disable_rules \
        and not ctx.config.approximate & {"int8", "bf16"}      # those rewrite the linears themselves


def _relayouting(ctx: Context) -> bool:
    return ctx.inference and ctx.config.tune and "channels_last" not in ctx.config.disable_rules


def _lowering(ctx: Context) -> bool:
    return ctx.config.codegen != "aten"


def _planned(ctx: Context) -> bool:
    return ctx.plan is not None


def _same(ctx: Context, gm: fx.GraphModule) -> fx.GraphModule:
    return gm


def _unlowered(ctx: Context, gm: fx.GraphModule) -> fx.GraphModule:
    return ctx.unprepared if ctx.unprepared is not None else gm


def _exact(ctx: Context, gm: fx.GraphModule) -> fx.GraphModule:
    _check_exact_fallback(ctx.weights)
    return gm


Pass = Callable[[fx.GraphModule, Context], PassResult]

#: the compiler: (name, pass, runs when, the graph a failure falls back to), in order. A pass that
#: fails is skipped with one warning and the program goes on from its fallback graph.
PASSES: list[tuple[str, Pass, Callable[[Context], bool], Callable[[Context, fx.GraphModule], fx.GraphModule]]] = [
    ("normalize", normalize_pass, lambda ctx: True, _same),
    ("rewrite", rewrite_pass, lambda ctx: ctx.config.rewrites, _same),
    ("approximate", approximate_pass, _approximating, _exact),
    ("merge", merge_pass, _merging, _same),
    ("layout", layout_pass, _relayouting, _same),
    ("prepare", prepare_pass, _lowering, _unlowered),
    ("lower", lower_pass, _lowering, _unlowered),
    ("build", build_pass, _planned, _unlowered),
    ("gemm", gemm_pass, lambda ctx: True, _same),
    ("attention", attention_pass, lambda ctx: True, _same),
]

#: the passes whose graph is the program as rewritten (before lowering): the run-time fallback
_BEFORE_LOWERING = ("normalize", "rewrite", "approximate", "merge", "layout")


def compile_graph(gm: fx.GraphModule, config: Config, *, label: str = "forward", hw: Any = None,
                  weights: dict | None = None, example_args: list | None = None,
                  stackable: frozenset[str] | None = None, hold_weights: bool = False,
                  inference: bool | None = None) -> CompiledGraph:
    """Optimize one ATen FX graph (every node with meta["val"]) into a callable that runs fused kernels:
    the passes of `PASSES` in order — normalize, rewrite, approximate, merge, layout, prepare, lower, build,
    gemm, attention.

    `weights` (placeholder name -> live tensor) and `example_args` (the full flat argument list) are
    needed only by the approximate stage, which measures accuracy and converts weights in place (or, with
    `hold_weights` — torch.compile — holds the converted weights and releases the fp32 ones: approx/held.py).
    `stackable`: placeholders (parameters) the caller makes adjacent in place when the program merges their
    products (fusion.optimize: `fusion.dialect.stacked.make_adjacent`); only they can be merged (`passes.merge`).
    `inference` (default: label == "inference"): a graph without autograd, whose caller converts the weights
    the program reads channels-last in place (fusion.passes.layout.channels_last_weights).
    """
    log = CompileLog(label, num_nodes=len(gm.graph.nodes))
    ctx = Context(config, hw if hw is not None else hardware(config), log, weights, example_args, stackable,
                  hold_weights, original=gm, inference=label == "inference" if inference is None else inference)
    for name, run, when, fallback in PASSES:
        if not when(ctx):
            continue
        result = log.run(name, run, gm, ctx, config=config, fallback=None)
        if result is None:
            gm = fallback(ctx, gm)
        else:
            gm = result.gm if result.gm is not None else gm
            log.record(result.info)
        if name in _BEFORE_LOWERING:
            ctx.rewritten = gm
    rewritten = ctx.rewritten if ctx.rewritten is not None else gm
    original = ctx.original
    return remember(CompiledGraph(gm, rewritten if rewritten is not gm else original, log, config, rewritten, original))


def lower_to_kernels(gm: fx.GraphModule, config: Config | None = None, hw: Any = None) -> Any:
    """The driver's prepare -> lower -> build passes on one graph, without the others (tests, tools): a
    lower.LowerResult (gm itself and no kernels when nothing is worth a kernel)."""
    from fusion.lower import LowerResult

    config = config or Config()
    ctx = Context(config, hw, CompileLog("lower"))
    if not _lowering(ctx):
        return LowerResult(gm, [])
    prepared = prepare_pass(gm, ctx).gm or gm
    lower_pass(prepared, ctx)
    built = build_pass(prepared, ctx)
    return LowerResult(built.gm or gm, built.info.get("kernels", []))


@dataclass
class CachedRewrite:
    gm: fx.GraphModule
    fired: dict
    stats: dict


def _rewrite(gm: fx.GraphModule, config: Config, hw: Any) -> Any:
    """The e-graph stage, memoised on disk by graph structure + shapes + config + versions + the hardware
    profile's identity (never weights): a second process optimizing the same architecture skips saturation
    and extraction, and a re-calibrated machine re-extracts (extraction prices with the profile)."""
    from fusion import rewrite as rewrites  # imported here so that a broken or missing stage is a fallback, not an import error

    from fusion.store import cache
    from fusion.store import serialize

    try:
        key = serialize.graph_key(gm, config.key(), cache.versions(), cache.profile_identity(hw))
    except TypeError:  # a graph we cannot serialise is simply not cached
        return rewrites.rewrite(gm, config, hw)
    path = cache.subdir("graphs", config.cache_dir) / f"{key}.json"
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    hit = _cached_rewrite(path, vals)
    if hit is not None:
        return hit
    with cache.exclusive(path):     # ranks rewriting the same graph: one saturates, the others read its result
        hit = _cached_rewrite(path, vals)
        if hit is not None:
            return hit
        result = rewrites.rewrite(gm, config, hw)
        try:
            payload = {"graph": serialize.graph_to_dict(result.gm), "fired": result.fired,
                       "stats": cache.jsonable(result.stats)}
            cache.write_json(path, payload)
        except (TypeError, ValueError, OSError):
            pass
    return result


def _cached_rewrite(path: Any, vals: list[Any]) -> CachedRewrite | None:
    from fusion.store import cache
    from fusion.store import serialize

    hit = cache.read_json(path)
    if hit is None:
        return None
    try:
        new = serialize.graph_from_dict(hit["graph"], vals)
        return CachedRewrite(new, hit["fired"], {**hit["stats"], "cache": "hit"})
    except Exception:  # noqa: BLE001 - a stale or unreadable entry is rebuilt
        return None


def _merge(gm: fx.GraphModule, hw: Any, stackable: frozenset[str], tuner: Any = None) -> Any:
    """Shared-input matmuls -> one GEMM + split where measured (or predicted) faster (fusion/passes/merge.py)."""
    from fusion.passes.merge import merge_shared_matmuls

    return merge_shared_matmuls(gm, hw, stackable, tuner)


def _approximate(gm: fx.GraphModule, config: Config, weights: dict, example_args: list, hold_weights: bool) -> Any:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from fusion.approx import apply_approximations

    with unset_fake_temporarily():   # inside torch.compile: the guard runs the program on the real inputs
        return apply_approximations(gm, config, weights, example_args, hold_weights=hold_weights)


def _check_exact_fallback(weights: dict) -> None:
    """The approximate stage failed: the exact graph runs, unless it reads weights an earlier approximate
    torch.compile released (their fp32 data is gone: running it would read zeros)."""
    from fusion.approx import held

    gone = sorted(name for name, t in weights.items() if held.is_released(t))
    if gone:
        from fusion.approx.held import ReleasedWeightError

        raise ReleasedWeightError(
            f"fusion: the approximate stage failed on a graph that reads weights an earlier approximate compile "
            f"released ({', '.join(gone[:4])}{', ...' if len(gone) > 4 else ''}), so the exact graph cannot run "
            "as a fallback either; see the warning above")


def aten_calls(gm: fx.GraphModule) -> int:
    """The call_function nodes of a program (what explain() counts as ATen calls beside the kernels)."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function")


@dataclass
class CompileRecord:
    """One entry of RECENT: what `fusion.explain_last()` needs of a compiled graph, without keeping the graph,
    its kernels or its weights alive. `log` (the approximate graph left out: it holds converted weights),
    `config`, the lowered program's `code` and `aten_calls`, all taken at compile time; `compiled`, the
    CompiledGraph while the user's program still holds it, None once it was dropped and freed."""

    log: CompileLog
    config: Config
    code: str
    aten_calls: int
    ref: weakref.ref[CompiledGraph]

    @property
    def compiled(self) -> CompiledGraph | None:
        return self.ref()

    @classmethod
    def of(cls, compiled: CompiledGraph) -> CompileRecord:
        log = compiled.log
        if getattr(log.approx, "gm", None) is not None:     # a copy of the log: the live graph keeps its own
            log = replace(log, approx=replace(log.approx, gm=None))
        return cls(log, compiled.config, compiled.gm.code, aten_calls(compiled.gm), weakref.ref(compiled))


#: the most recent compiles (newest last), for `fusion.explain_last()` / `fusion.last_compiled()` after
#: torch.compile: lightweight records, so a compiled graph the user dropped is freed.
RECENT: list[CompileRecord] = []


def remember(compiled: CompiledGraph) -> CompiledGraph:
    """Record `compiled` in RECENT (the 32 newest kept) and return it unchanged."""
    RECENT.append(CompileRecord.of(compiled))
    del RECENT[:-32]
    trim_process_caches()
    from fusion.store import bounded, cache

    try:                                    # the cache directory stays under its size limit
        bounded.enforce(cache.cache_dir(compiled.config.cache_dir), compiled.config.cache_limit_mb)
    except OSError:
        pass
    return compiled


#: torch keeps, per process and without bound, the source of every GraphModule it ever generated (for
#: tracebacks: torch.fx.graph_module._loader, and linecache) and the results of fake-tensor dispatch by
#: shape (FakeTensorMode.cache). A compile makes ~20 GraphModules and ~50 dispatch entries per new shape, so
#: a process compiling thousands of shapes grew by ~70 kB per compile; past these sizes the oldest go.
FX_SOURCES_KEPT = 2000
FAKE_DISPATCH_KEPT = 20_000


def trim_process_caches() -> None:
    """Bound torch's per-process caches that every compile adds to (the source lines of the oldest
    generated GraphModules are then no longer shown in tracebacks; nothing else changes)."""
    import linecache

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx import graph_module as fx_graph_module

    sources = getattr(getattr(fx_graph_module, "_loader", None), "eval_cache", None)
    if isinstance(sources, dict) and len(sources) > FX_SOURCES_KEPT:
        for key in list(sources)[: len(sources) - FX_SOURCES_KEPT]:     # insertion order: oldest first
            sources.pop(key, None)
            linecache.cache.pop(key, None)
    dispatch = getattr(FakeTensorMode, "cache", None)
    if isinstance(dispatch, dict) and len(dispatch) > FAKE_DISPATCH_KEPT:
        dispatch.clear()


def hardware(config: Config) -> Any:
    """The hardware profile extraction and lowering cost things with (calibrated once per machine)."""
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        from fusion.costmodel import current_profile

        # Inside torch.compile the backend runs under AOTAutograd's fake mode; measuring the machine
        # needs real tensors, so calibration (once per machine, then read from disk) steps out of it.
        with unset_fake_temporarily():
            return current_profile(config.cache_dir)
    except Exception as e:  # noqa: BLE001
        warn_fallback("calibrate", f"{type(e).__name__}: {e}", what_runs="a default hardware profile is used")
        return None
