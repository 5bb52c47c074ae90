"""The compiler, top to bottom: one named pass after another, each a graph in and a graph out.

    normalize  ATen graph            -> fusion dialect            (capture.normalize)
    rewrite    fusion dialect        -> fusion dialect, fused ops (rewrites.rewrite: e-graph, saturate, extract)
    lower      fusion dialect        -> kernels + ATen calls      (lower.lower_to_kernels: schedule, codegen, build)

Every pass may fail on a graph we have never seen. Then the pass is skipped with ONE warning naming the
stage and the error, and the program runs on what the previous pass produced (ultimately the original
ATen graph), so an internal failure never changes results and never crashes the user's program.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch.fx as fx

from fusion import progress
from fusion.capture import normalize
from fusion.config import Config
from fusion.errors import warn_fallback


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
    onednn_gemms: int = 0                                # fp32 GEMMs moved to oneDNN (fusion/gemm.py)

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
        return self.fallback_gm(*args)

    @property
    def code(self) -> str:
        return self.gm.code


def compile_graph(gm: fx.GraphModule, config: Config, *, label: str = "forward", hw: Any = None,
                  weights: dict | None = None, example_args: list | None = None,
                  stackable: frozenset[str] | None = None, hold_weights: bool = False) -> CompiledGraph:
    """Optimize one ATen FX graph (every node with meta["val"]) into a callable that runs fused kernels.

    `weights` (placeholder name -> live tensor) and `example_args` (the full flat argument list) are
    needed only by the approximate stage, which measures accuracy and converts weights in place (or, with
    `hold_weights` — torch.compile — holds the converted weights and releases the fp32 ones: approx/held.py).
    `stackable`: placeholders (parameters) the caller makes adjacent in place when the program merges their
    products (fusion.optimize: `fusion.stacked.make_adjacent`); only they can be merged (`shared_matmul`).
    """
    log = CompileLog(label, num_nodes=len(gm.graph.nodes))
    original = gm
    hw = hw if hw is not None else hardware(config)

    gm = log.run("normalize", normalize, gm, config=config, fallback=gm)

    if config.rewrites:
        exact = config
        if "relu_attention" in config.approximate:  # keep softmax visible to the approximate rule
            exact = config.replace(disable_rules=config.disable_rules | {"attention"})
        result = log.run("rewrite", _rewrite, gm, exact, hw, config=config, fallback=None)
        if result is not None:
            gm = result.gm
            log.fired = result.fired
            log.rewrite_stats = result.stats
    rewritten = gm

    if config.approximate and weights is not None and example_args is not None:
        approx = log.run("approximate", _approximate, gm, config, weights, example_args, hold_weights,
                         config=config, fallback=None)
        if approx is None:
            _check_exact_fallback(weights)
        if approx is not None:
            # weights are now int8/bf16 in place: the exact graphs are no longer valid fallbacks
            gm = rewritten = original = approx.gm
            log.approx = approx

    if stackable and hw is not None and "shared_matmul" not in config.disable_rules \
            and not config.approximate & {"int8", "bf16"}:      # those rewrite the linears themselves
        merged = log.run("merge", _merge, gm, hw, stackable, config=config, fallback=None)
        if merged is not None and merged.fired:
            gm = rewritten = merged.gm
            log.fired = {**log.fired, **merged.fired}
        if merged is not None and merged.decisions:
            log.rewrite_stats = {**log.rewrite_stats, "shared_matmul": merged.decisions}

    if config.codegen != "aten":
        lowered = log.run("lower", _lower, gm, config, hw, config=config, fallback=None)
        if lowered is not None:
            gm = lowered.gm
            log.kernels = lowered.kernels

    gm = log.run("gemm", _gemm, gm, hw, log, config=config, fallback=gm)

    return remember(CompiledGraph(gm, rewritten if rewritten is not gm else original, log, config, rewritten, original))


@dataclass
class CachedRewrite:
    gm: fx.GraphModule
    fired: dict
    stats: dict


def _rewrite(gm: fx.GraphModule, config: Config, hw: Any) -> Any:
    """The e-graph stage, memoised on disk by graph structure + shapes + config + versions (never weights):
    a second process optimizing the same architecture skips saturation and extraction."""
    import rewrites  # imported here so that a broken or missing stage is a fallback, not an import error

    from fusion import cache, serialize

    try:
        key = serialize.graph_key(gm, config.key(), cache.versions())
    except TypeError:  # a graph we cannot serialise is simply not cached
        return rewrites.rewrite(gm, config, hw)
    path = cache.subdir("graphs", config.cache_dir) / f"{key}.json"
    hit = cache.read_json(path)
    if hit is not None:
        vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
        try:
            new = serialize.graph_from_dict(hit["graph"], vals)
            return CachedRewrite(new, hit["fired"], {**hit["stats"], "cache": "hit"})
        except Exception:  # noqa: BLE001 - a stale or unreadable entry is rebuilt
            pass
    result = rewrites.rewrite(gm, config, hw)
    try:
        payload = {"graph": serialize.graph_to_dict(result.gm), "fired": result.fired, "stats": cache.jsonable(result.stats)}
        cache.write_json(path, payload)
    except (TypeError, ValueError, OSError):
        pass
    return result


def _merge(gm: fx.GraphModule, hw: Any, stackable: frozenset[str]) -> Any:
    """Shared-input matmuls -> one GEMM + split where the cost model predicts it faster (rewrites/shared_matmul.py)."""
    from rewrites.shared_matmul import merge_shared_matmuls

    return merge_shared_matmuls(gm, hw, stackable)


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


def _gemm(gm: fx.GraphModule, hw: Any, log: CompileLog) -> fx.GraphModule:
    """fp32 CPU matrix products to the faster GEMM library by the profile (fusion/gemm.py)."""
    from fusion.gemm import lower_stacked_linears, use_onednn_gemms

    gm, _ = lower_stacked_linears(gm, hw)              # merged shared-input products (fusion/stacked.py)
    gm, log.onednn_gemms = use_onednn_gemms(gm, hw)    # a new module when it changes anything
    return gm


def _lower(gm: fx.GraphModule, config: Config, hw: Any) -> Any:
    from fusion import lower

    return lower.lower_to_kernels(gm, config, hw)


#: the most recent compile logs (newest last), for `fusion.explain_last()` after torch.compile.
RECENT: list[CompiledGraph] = []


def remember(compiled: CompiledGraph) -> CompiledGraph:
    RECENT.append(compiled)
    del RECENT[:-32]
    return compiled


def hardware(config: Config) -> Any:
    """The hardware profile extraction and lowering cost things with (calibrated once per machine)."""
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        from costmodel import current_profile

        # Inside torch.compile the backend runs under AOTAutograd's fake mode; measuring the machine
        # needs real tensors, so calibration (once per machine, then read from disk) steps out of it.
        with unset_fake_temporarily():
            return current_profile(config.cache_dir)
    except Exception as e:  # noqa: BLE001
        warn_fallback("calibrate", f"{type(e).__name__}: {e}", what_runs="a default hardware profile is used")
        return None
