"""`fusion.optimize`: capture a model, compile its graph, return a module that runs the fused program.

Before capturing, the structural cache is consulted (fusion/store/structural.py): a module whose computation,
traced on fake tensors, matches a program compiled before (any weights) reuses it without capture. Capture
then tries `torch.export` (one whole graph, weights lifted to placeholders bound by name). Models
export cannot take (data-dependent Python, outputs of unregistered types such as HF caches) are captured
by Dynamo instead — the same path as `torch.compile(backend="fusion")` — possibly as several graphs.
"""
from __future__ import annotations

import functools
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fusion.store import structural
from fusion.capture import Captured, capture_module, check_inputs, shapes
from fusion.config import Config
from fusion.errors import FusionInputError, warn_fallback
from fusion.pipeline import CompiledGraph, compile_graph, hardware
from fusion.analysis.explain import explain_text, format_table, kernel_table
from fusion.analysis.timing import format_split

#: What optimize/analyze/compare take as example inputs: the positional arguments of model.forward as a
#: tuple or list, or one tensor (fusion.capture.check_inputs makes it a tuple).
ExampleInputs = Union[torch.Tensor, tuple[Any, ...], list[Any]]
#: How one graph placeholder is read at call time: a weight, buffer or lifted constant, looked up by name on
#: the original module each call (so in-place updates are seen); None marks a user input.
Accessor = Callable[[], torch.Tensor]
#: What a torch.export graph is specialised to (`_signature`): one entry per input leaf.
Signature = tuple[tuple[Any, ...], ...]
#: One compiled form of the model: its capture, how each placeholder is read, the compiled graph.
Variant = tuple[Captured, list["Accessor | None"], CompiledGraph]


class OptimizedModule(torch.nn.Module):
    """The optimized program. Call it like the original model (inference: it runs under no_grad; inputs
    that require grad, with grad mode on, run the original module instead, with one warning).

    Weights are not copied: they are looked up by name on the original module at every call, so
    in-place updates (load_state_dict, optimizer steps) are seen. `.code` prints the program.

    Public state, read by fusion.analysis and fusion.store: `captured` (the first torch.export capture, None
    when nothing was captured whole), `accessors` (how each of its placeholders is bound), `example_inputs`,
    `graphs` (the compiled graphs) and `flat_args(*args, **kwargs)` (user inputs -> the graph's arguments).
    """

    MAX_SHAPE_VARIANTS = 8
    MAX_SYMBOLIC_CAPTURES = 2

    def __init__(self, model: torch.nn.Module, config: Config, example_inputs: Sequence[Any]) -> None:
        super().__init__()
        self.original = model  # registered: state_dict() and .to() reach the same weights
        self.config = config
        self.capture_method = "none"
        self.capture_note = ""
        self.capture_seconds = 0.0
        self.graphs: list[CompiledGraph] = []
        self.example_inputs: tuple[Any, ...] = tuple(example_inputs)
        self.captured: Captured | None = None
        self.accessors: list[Accessor | None] = []
        self._dynamo: Callable[..., Any] | None = None
        self._warned_grad = False
        # torch.export specialises the graph to the example shapes; other shapes get their own capture
        # (kernels take sizes at run time, so recompiling them is a cache hit), at most MAX_SHAPE_VARIANTS.
        self._variants: dict[Signature, Variant] = {}
        # after a second shape that differs only in sizes, one capture with those dims symbolic serves all
        # sizes it matches (fusion/capture/shapes.py), like Dynamo's automatic dynamic shapes
        self._symbolic: list[tuple[shapes.ShapePattern, Variant]] = []
        self._symbolic_tries = 0

    # -- construction ----------------------------------------------------------------------------
    def _from_structural_cache(self, args: Sequence[Any], kwargs: dict[str, Any],
                               key: str | None = None) -> tuple[bool, str | None]:
        """Look the module up in the structural cache before capturing it (fusion/store/structural.py).
        Returns (hit, key): on a hit the variant is ready; on a miss, `key` is where to store it. `key`: the
        module's signature when already computed (a second look after waiting on another process's lock)."""
        if kwargs:
            return False, None
        t0 = time.perf_counter()
        try:
            key = key or structural.signature(self.original, args, self.config)
            hit = structural.lookup(key, self.original, self.config)
        except Exception as e:  # noqa: BLE001 - the cache is an optimisation: capture as usual
            structural.log.debug("structural cache skipped: %s: %s", type(e).__name__, e)
            return False, None
        if hit is None:
            return False, key
        if not self._variants:
            self.capture_method = "structural cache"
            self.capture_note = (" (torch.export skipped: the module's computation, traced on fake tensors, "
                                 f"matched a cached program; {time.perf_counter() - t0:.2f} s)")
        self._add_variant(hit.captured, hit.graph, args, kwargs)
        return True, None

    def _new_variant(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Variant:
        """The program for inputs no variant takes yet: from the structural cache, else one symbolic capture
        when only sizes changed since the example inputs, else a capture specialised to these shapes."""
        hit, key = self._from_structural_cache(args, kwargs)
        if not hit:
            if self._use_symbolic_export(args, kwargs):
                return self._symbolic[-1][1]
            self._use_export(capture_module(self.original, args), args, kwargs, key)
        return self._variants[_signature(args, kwargs)]

    def _symbolic_variant(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Variant | None:
        now = shapes.leaves(args, kwargs)
        return next((variant for pattern, variant in reversed(self._symbolic) if pattern.matches(now)), None)

    def _use_symbolic_export(self, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
        """Capture with the dims that differ from the example inputs (and those earlier symbolic captures
        kept symbolic) marked dynamic; False when sizes are not all that changed or export specialised
        them all (then the caller captures these shapes statically)."""
        if kwargs or self._symbolic_tries >= self.MAX_SYMBOLIC_CAPTURES:
            return False
        dims = shapes.differing_dims(shapes.leaves(self.example_inputs, {}), shapes.leaves(args, {}))
        if dims is None:
            return False
        for pattern, _ in self._symbolic:
            for ds, sizes in zip(dims, pattern.sizes):
                ds.update(d for d, s in enumerate(sizes or ()) if not isinstance(s, int))
        self._symbolic_tries += 1
        try:
            captured = capture_module(self.original, args, shapes.dynamic_shapes_spec(self.original, args, dims))
            assert captured.program is not None
            users = [n.meta.get("val") for n, (kind, _) in zip(_placeholders(captured), captured.input_bindings)
                     if kind == "user"]
            pattern = shapes.ShapePattern.of(users, shapes.leaves(args, {}), captured.program.range_constraints)
        except Exception as e:  # noqa: BLE001 - a static capture of these shapes is always correct
            structural.log.debug("symbolic capture skipped: %s: %s", type(e).__name__, e)
            return False
        if not (pattern.symbolic and pattern.matches(shapes.leaves(args, {}))):
            return False
        self._use_export(captured, args, kwargs, None, pattern=pattern)
        return True

    def _use_export(self, captured: Captured, args: Sequence[Any], kwargs: dict[str, Any],
                    key: str | None = None, pattern: shapes.ShapePattern | None = None) -> None:
        """Compile a fresh torch.export capture, store it in the structural cache under `key`, add the variant
        (for the inputs' exact shapes, or for every input `pattern` matches)."""
        self.capture_method = "torch.export"
        assert captured.gm is not None  # a fresh capture always has its graph (only cached ones lack it)
        weights = flat = None
        if self.config.approximate:  # the accuracy guard runs the program on the example inputs
            from fusion.approx import bind

            weights, flat = bind(self.original, captured, args)
        params = frozenset(n.name for n, (kind, _) in zip(_placeholders(captured), captured.input_bindings)
                           if kind == "param")
        graph = compile_graph(captured.gm, self.config, label="forward", weights=weights, example_args=flat,
                              stackable=params, inference=True)
        structural.store(key, captured, graph, self.config)
        if pattern is None:
            self._add_variant(captured, graph, args, kwargs)
            return
        accessors = [self._accessor(captured, k, n) for k, n in captured.input_bindings]
        self._stack_weights(graph, accessors)
        self._symbolic.append((pattern, (captured, accessors, graph)))

    def _add_variant(self, captured: Captured, graph: CompiledGraph, args: Sequence[Any],
                     kwargs: dict[str, Any]) -> None:
        accessors = [self._accessor(captured, k, n) for k, n in captured.input_bindings]
        self._stack_weights(graph, accessors)
        if not self._variants:
            self.captured, self.accessors = captured, accessors
            self.graphs = [graph]
        if len(self._variants) >= self.MAX_SHAPE_VARIANTS:
            self._variants.pop(next(iter(self._variants)))
        self._variants[_signature(args, kwargs)] = (captured, accessors, graph)

    def _stack_weights(self, graph: CompiledGraph, accessors: list[Accessor | None]) -> None:
        """The weights of each merged product group (`fusion.stacked_linear`, fusion/passes/merge.py) become
        adjacent rows of one block, in place, group by group (fusion.dialect.stacked.make_adjacent), so the merged
        GEMM reads them as one zero-copy view. A group that cannot be moved runs as separate GEMMs (correct).
        The weights a channels-last program reads (fusion/passes/layout.py) become channels-last in place."""
        from fusion.dialect.stacked import groups_of, make_adjacent
        from fusion.passes.layout import channels_last_weights, to_channels_last_

        phs = [n.name for n in graph.gm.graph.nodes if n.op == "placeholder"]
        live = {ph: acc for ph, acc in zip(phs, accessors) if acc is not None}
        to_channels_last_([live[n]() for n in channels_last_weights(graph.gm) if n in live])
        groups = groups_of(graph.gm)
        if not groups:
            return
        outcome = graph.log.rewrite_stats.setdefault("stacked_weights", {})
        for names in groups:
            if not all(n in live for n in names):
                continue
            try:
                outcome[",".join(names)] = make_adjacent([live[n]() for n in names])
            except Exception as e:  # noqa: BLE001 - values are never changed by a move: the separate GEMMs run
                outcome[",".join(names)] = f"{type(e).__name__}: {e}"
                warn_fallback("stack weights", f"{type(e).__name__}: {e}"[:300],
                              what_runs="those products run as separate GEMMs")

    def _use_dynamo(self) -> None:
        from fusion.torch_compile import fusion_backend

        self.capture_method = "dynamo"
        backend = functools.partial(fusion_backend, options=self.config, on_compiled=self.graphs.append)
        self._dynamo = compiled = torch.compile(self.original, backend=backend)
        with torch.no_grad():
            compiled(*self.example_inputs)  # compiles now, not at the user's first call

    def _accessor(self, captured: Captured, kind: str, name: str) -> Accessor | None:
        """How the placeholder bound to (kind, name) is read at call time; None for a user input."""
        if kind == "user":
            return None
        if kind == "constant":
            # lifted constants make a module uncacheable (fusion/store/structural.py), so a capture ran
            assert captured.program is not None
            value = captured.program.constants[name]
            return lambda: value
        return self._weight(name)

    def _weight(self, name: str) -> Accessor:
        """Reads the parameter or buffer `name` (a dotted path) of the original module at each call."""
        owner_path, _, attr = name.rpartition(".")
        owner = self.original.get_submodule(owner_path) if owner_path else self.original
        return lambda: getattr(owner, attr)

    def flat_args(self, *args: Any, **kwargs: Any) -> list[Any]:
        """The user inputs `args, kwargs` (as the model takes them) flattened into the argument list of the
        captured graph: weights, buffers and constants read from the module now, user leaves in order."""
        return _flat_args(self.accessors, args, kwargs)

    # -- running ---------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in pytree.tree_leaves((args, kwargs))):
            return self._differentiable(*args, **kwargs)
        if self._dynamo is not None:
            with torch.no_grad():
                return self._dynamo(*args, **kwargs)
        if self.captured is None:  # nothing could be captured: the original model runs
            return self.original(*args, **kwargs)
        variant = self._variants.get(_signature(args, kwargs)) or self._symbolic_variant(args, kwargs)
        if variant is None:
            try:
                variant = self._new_variant(args, kwargs)
            except Exception as e:  # noqa: BLE001
                warn_fallback("capture", f"new input shapes: {type(e).__name__}: {e}".splitlines()[0][:300],
                              what_runs="the original module runs for these inputs")
                return self.original(*args, **kwargs)
        cap, accessors, graph = variant
        flat = _flat_args(accessors, args, kwargs)
        with torch.no_grad():
            outs = graph(*flat)
        if cap.buffer_mutations:
            for i, target in cap.buffer_mutations.items():
                self._weight(target)().copy_(outs[i])
            outs = [o for i, o in enumerate(outs) if i not in cap.buffer_mutations]
        return pytree.tree_unflatten(list(outs), cap.out_spec)

    def _differentiable(self, *args: Any, **kwargs: Any) -> Any:
        """Inputs that require grad, with grad mode on: the optimized program is an inference program (its
        outputs carry no graph), so the original module runs, and says so once."""
        if not self._warned_grad:
            self._warned_grad = True
            warnings.warn("fusion: this optimized module runs inference programs (outputs carry no autograd "
                          "graph); inputs that require grad run the original module instead, differentiably. "
                          "Call it under torch.no_grad() for the optimized program, or use "
                          "torch.compile(model, backend=\"fusion\") to train with fused kernels.", stacklevel=3)
        return self.original(*args, **kwargs)

    # -- inspection ------------------------------------------------------------------------------
    @property
    def code(self) -> str:
        """The optimized program as Python (fused-kernel calls and ATen calls), one block per graph."""
        if not self.graphs:
            return "# nothing was captured: the original module runs\n"
        return "\n".join(g.code for g in self.graphs)

    @property
    def shape_variants(self) -> list[str]:
        """The inputs each compiled capture takes, one line each: `static [(2, 8, 32)]` for a capture
        specialised to those shapes, `symbolic [(2, s0, 32)]` for one made after the sizes changed."""
        def show(sizes: Any) -> str:
            return "(" + ", ".join(str(s) for s in sizes) + ")" if sizes is not None else "-"

        out = ["static [" + ", ".join(show(sig[0]) if isinstance(sig[0], tuple) else sig[1] for sig in signature) + "]"
               for signature in self._variants]
        out += ["symbolic [" + ", ".join(show(sz) for sz in pattern.sizes) + "]" for pattern, _ in self._symbolic]
        return out

    @property
    def graph_module(self) -> fx.GraphModule | None:
        """The lowered GraphModule of the first compiled graph; None when nothing was captured."""
        return self.graphs[0].gm if self.graphs else None

    def explain(self) -> str:
        """What the optimizer did: capture, passes and their time, rules fired where, kernels made, fallbacks."""
        name = type(self.original).__name__
        head = f"capture: {self.capture_method} ({self.capture_seconds:.2f} s){self.capture_note}\n"
        if len(self.shape_variants) > 1:
            head += "captures by input shape: " + "; ".join(self.shape_variants) + "\n"
        if not self.graphs:
            return head + "fusion: nothing was captured, so the original module runs unchanged.\n"
        return head + "\n".join(explain_text(name, g) for g in self.graphs)

    def save(self, path: str | Path) -> Path:
        """Write the program (readable JSON + Python), and the weights as safetensors, to directory `path`;
        returns that directory."""
        from fusion.store.program import save_program

        return save_program(self, path)

    def report(self, *, measure: bool = True, print_table: bool = True) -> list[dict[str, Any]]:
        """Per kernel: FLOPs, bytes, arithmetic intensity, predicted and measured time, achieved bandwidth, MBU.

        Measured times come from running the program on the example inputs (a few repetitions; export
        capture only — with Dynamo capture the graph inputs are not known here, so only predictions).
        Returns the rows; prints them as a table unless print_table=False.
        """
        rows: list[dict[str, Any]] = []
        for g in self.graphs:
            inputs = None
            if measure and self.captured is not None:
                inputs = self.flat_args(*self.example_inputs)
            rows += kernel_table(g, inputs)
        if print_table:
            print(format_table(rows))
            if measure and self.captured is not None:
                print("\nwhere the time goes (fusion.analysis.timing):\n" + format_split(self.time_split()))
        return rows

    def time_split(self, example_inputs: ExampleInputs | None = None) -> dict[str, Any]:
        """The first graph's measured time on `example_inputs` (default: the example inputs) as GEMM,
        attention, fused-kernel and other seconds, and its fraction of the GEMM roofline
        (fusion.analysis.timing.time_split). Export captures only (Dynamo graphs' inputs are not known here)."""
        from fusion.analysis.timing import graph_stats, time_split

        if self.captured is None or not self.graphs:
            raise FusionInputError(f"time_split needs a program captured whole by torch.export; this model was "
                                   f"captured by {self.capture_method!r}")
        inputs = self.example_inputs if example_inputs is None else check_inputs(self.original, example_inputs)
        g = self.graphs[0]
        hw = hardware(g.config)
        stats, _ = graph_stats(g.gm, self.flat_args(*inputs), hw, {k.name: k for k in g.log.kernels}, g.program_gm)
        return time_split(g.gm, stats, hw, g.config.cache_dir)


def _as_config(config: Config | dict[str, Any] | None, options: dict[str, Any]) -> Config:
    """The Config to use: `config` (a Config or a dict of its fields) or else the keyword `options`."""
    if config is None:
        return Config.from_options(options)
    if options:
        raise FusionInputError("pass either config=fusion.Config(...) or keyword options, not both")
    if isinstance(config, dict):
        return Config.from_options(config)
    if not isinstance(config, Config):
        raise FusionInputError(f"config must be a fusion.Config, got {type(config).__name__}")
    return config


def optimize(model: torch.nn.Module, example_inputs: ExampleInputs, config: Config | dict[str, Any] | None = None,
             **options: Any) -> OptimizedModule:
    """Capture `model` on `example_inputs`, rewrite, fuse and compile it; return the optimized module.

    >>> opt = fusion.optimize(model, (x,))
    >>> opt(x)                      # runs fused kernels
    >>> print(opt.explain())        # rules fired, kernels made, predicted vs measured cost
    """
    config = _as_config(config, options)
    example_inputs = check_inputs(model, example_inputs)
    opt = OptimizedModule(model, config, example_inputs)
    t0 = time.perf_counter()
    hit, key = opt._from_structural_cache(example_inputs, {})
    if hit:  # nothing to capture or compile
        opt.capture_seconds = time.perf_counter() - t0
        return opt
    if key is None:
        return _capture_and_compile(opt, model, example_inputs, config, None, t0)
    with structural.building(key, config):    # processes optimizing the same architecture: one compiles it
        hit, key = opt._from_structural_cache(example_inputs, {}, key)
        if hit:                               # another process stored it while this one waited
            opt.capture_seconds = time.perf_counter() - t0
            return opt
        return _capture_and_compile(opt, model, example_inputs, config, key, t0)


def _capture_and_compile(opt: OptimizedModule, model: torch.nn.Module, example_inputs: ExampleInputs,
                         config: Config, key: str | None, t0: float) -> OptimizedModule:
    """optimize() past a structural-cache miss: capture with torch.export (else Dynamo), compile, store."""
    try:
        captured = capture_module(model, example_inputs)
    except Exception as export_error:  # noqa: BLE001 - try the more permissive capture
        opt.capture_note = f"; torch.export failed ({type(export_error).__name__}: {str(export_error).splitlines()[0][:200]})"
        try:
            opt._use_dynamo()
        except Exception as e:  # noqa: BLE001 - an uncapturable model still runs, unoptimized
            if not config.fallback:
                raise
            opt._dynamo = None
            opt.capture_method = "none"
            warn_fallback("capture", f"{type(e).__name__}: {e}".splitlines()[0][:300],
                          what_runs="the original module runs unoptimized")
        opt.capture_seconds = time.perf_counter() - t0
        return opt
    opt.capture_seconds = time.perf_counter() - t0
    opt._use_export(captured, example_inputs, {}, key)
    return opt


def _placeholders(captured: Captured) -> list[fx.Node]:
    assert captured.gm is not None  # called on fresh captures only (OptimizedModule._use_export)
    return [n for n in captured.gm.graph.nodes if n.op == "placeholder"]


def _flat_args(accessors: Sequence[Accessor | None], args: Sequence[Any], kwargs: dict[str, Any]) -> list[Any]:
    """One variant's graph arguments: each accessor's value, or the next user leaf of (args, kwargs)."""
    user = iter(pytree.tree_leaves((tuple(args), kwargs)))
    return [next(user) if acc is None else acc() for acc in accessors]


def _signature(args: Sequence[Any], kwargs: dict[str, Any]) -> Signature:
    """What a torch.export graph is specialised to: shapes, dtypes and devices of tensors, other values."""
    return tuple(
        (tuple(x.shape), x.dtype, x.device.type) if isinstance(x, torch.Tensor) else (type(x).__name__, repr(x)[:64])
        for x in pytree.tree_leaves((tuple(args), kwargs))
    )
