"""`fusion.optimize`: capture a model, compile its graph, return a module that runs the fused program."""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fusion.capture import Captured, capture_module, check_inputs
from fusion.config import Config
from fusion.errors import FusionInputError, warn_fallback
from fusion.pipeline import CompiledGraph, compile_graph
from fusion.reporting import explain_text, kernel_table, format_table


class OptimizedModule(torch.nn.Module):
    """The optimized program. Call it like the original model (inference: it runs under no_grad).

    Weights are not copied: they are looked up by name on the original module at every call, so
    in-place updates (load_state_dict, optimizer steps) are seen. `.code` prints the program.
    """

    def __init__(self, model: torch.nn.Module, captured: Captured | None, compiled: CompiledGraph | None,
                 config: Config, example_inputs: Sequence[Any], capture_seconds: float):
        super().__init__()
        self.original = model  # registered: state_dict() and .to() reach the same weights
        self._captured = captured
        self._compiled = compiled
        self.config = config
        self._example_inputs = tuple(example_inputs)
        self._capture_seconds = capture_seconds
        self._accessors = [] if captured is None else [self._accessor(k, n) for k, n in captured.input_bindings]

    def _accessor(self, kind: str, name: str) -> Any:
        if kind == "user":
            return None
        if kind == "constant":
            value = self._captured.program.constants[name]
            return lambda: value
        owner_path, _, attr = name.rpartition(".")
        owner = self.original.get_submodule(owner_path) if owner_path else self.original
        return lambda: getattr(owner, attr)

    # -- running ---------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled is None:  # capture failed: the original model runs
            return self.original(*args, **kwargs)
        cap = self._captured
        user = iter(pytree.tree_leaves((args, kwargs)))
        flat = []
        for acc in self._accessors:
            flat.append(next(user) if acc is None else acc())
        with torch.no_grad():
            outs = self._compiled(*flat)
        if cap.buffer_mutations:
            for i, target in cap.buffer_mutations.items():
                self._accessor("buffer", target)().copy_(outs[i])
            outs = [o for i, o in enumerate(outs) if i not in cap.buffer_mutations]
        return pytree.tree_unflatten(list(outs), cap.program.call_spec.out_spec)

    # -- inspection ------------------------------------------------------------------------------
    @property
    def code(self) -> str:
        """The optimized program as Python (fused-kernel calls and ATen calls)."""
        return self._compiled.code if self._compiled is not None else "# capture failed: the original module runs\n"

    @property
    def graph_module(self) -> fx.GraphModule | None:
        return None if self._compiled is None else self._compiled.gm

    @property
    def compile_log(self):
        return None if self._compiled is None else self._compiled.log

    def explain(self) -> str:
        """What the optimizer did: passes and their time, rules fired where, kernels made, fallbacks."""
        if self._compiled is None:
            return "fusion: capture failed, so the original module runs unchanged.\n"
        return explain_text(type(self.original).__name__, self._compiled, self._capture_seconds)

    def report(self, *, measure: bool = True, print_table: bool = True) -> list[dict]:
        """Per kernel: FLOPs, bytes, arithmetic intensity, predicted and measured time, achieved bandwidth.

        Measured times come from running the program on the example inputs (a few repetitions).
        Returns the rows; prints them as a table unless print_table=False.
        """
        if self._compiled is None:
            return []
        inputs = None
        if measure:
            user = iter(pytree.tree_leaves((self._example_inputs, {})))
            inputs = [next(user) if acc is None else acc() for acc in self._accessors]
        rows = kernel_table(self._compiled, inputs)
        if print_table:
            print(format_table(rows))
        return rows


def optimize(model: torch.nn.Module, example_inputs: Any, config: Config | None = None, **options: Any) -> OptimizedModule:
    """Capture `model` on `example_inputs`, rewrite, fuse and compile it; return the optimized module.

    >>> opt = fusion.optimize(model, (x,))
    >>> opt(x)                      # runs fused kernels
    >>> print(opt.explain())        # rules fired, kernels made, predicted vs measured cost
    """
    if config is None:
        config = Config.from_options(options)
    elif options:
        raise FusionInputError("pass either config=fusion.Config(...) or keyword options, not both")
    elif not isinstance(config, Config):
        if isinstance(config, dict):
            config = Config.from_options(config)
        else:
            raise FusionInputError(f"config must be a fusion.Config, got {type(config).__name__}")
    example_inputs = check_inputs(model, example_inputs)

    t0 = time.perf_counter()
    try:
        captured = capture_module(model, example_inputs)
    except Exception as e:  # noqa: BLE001 - an uncapturable model still runs, unoptimized
        if not config.fallback:
            raise
        warn_fallback("capture", f"{type(e).__name__}: {e}".splitlines()[0][:300],
                      what_runs="the original module runs unoptimized")
        return OptimizedModule(model, None, None, config, example_inputs, time.perf_counter() - t0)
    capture_seconds = time.perf_counter() - t0
    compiled = compile_graph(captured.gm, config, label="forward")
    return OptimizedModule(model, captured, compiled, config, example_inputs, capture_seconds)
