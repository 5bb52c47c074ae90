"""`torch.compile(model, backend="fusion")`: Dynamo captures, AOTAutograd splits forward and backward
into ATen graphs, and each graph goes through `pipeline.compile_graph`. Under `dynamic=True` the float
inputs Dynamo made of module attributes (a norm's eps) are constants again, behind a value guard
(`fusion/capture/floats.py`).

Registered through the `torch_dynamo_backends` entry point (pyproject.toml) and, as a safety net for
un-installed checkouts, by `import fusion`.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch.fx as fx

from fusion.capture.floats import guarded, specialize_floats
from fusion.config import Config

if TYPE_CHECKING:  # annotations only: the driver is imported when a graph is compiled
    from fusion.pipeline import CompiledGraph


def fusion_backend(gm: fx.GraphModule, example_inputs: list[Any], options: Mapping[str, Any] | Config | None = None,
                   on_compiled: Callable[[CompiledGraph], None] | None = None,
                   **_ignored: Any) -> Callable[..., Any]:
    """A Dynamo backend. `options` are `fusion.Config` fields, e.g. `options={"approximate": {"bf16"}}`.

    `on_compiled(compiled_graph)` is called for every graph compiled (fusion.optimize collects them).
    """
    asked = Config.from_options(options)
    config = _approximate_config(asked, example_inputs)
    traced = fx.GraphModule(gm, copy.deepcopy(gm.graph))     # as Dynamo traced it: runs where a guard fails
    fixed = specialize_floats(gm, example_inputs)           # dynamic=True's float inputs, back to constants
    if fixed:
        return guarded(_compile(gm, example_inputs, asked, config, on_compiled), traced, fixed)
    return _compile(gm, example_inputs, asked, config, on_compiled)


def _compile(gm: fx.GraphModule, example_inputs: list[Any], asked: Config, config: Config,
             on_compiled: Callable[[CompiledGraph], None] | None) -> Callable[..., Any]:
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from fusion.store import dynamo_cache
    from fusion.pipeline import compile_graph, remember

    # warm path: an inference graph compiled before runs its stored program, without AOTAutograd
    try:
        warm_key = dynamo_cache.key(gm, example_inputs, config)
        hit = dynamo_cache.lookup(warm_key, config) if warm_key is not None else None
    except Exception:  # noqa: BLE001 - the cache is an optimisation: compile the usual way
        warm_key, hit = None, None
    def warm(hit: CompiledGraph) -> Callable[..., Any]:
        if on_compiled is not None:
            on_compiled(hit)
        return dynamo_cache.runner(_weights_channels_last(remember(hit), hit.gm))

    if hit is not None:
        return warm(hit)

    def compiler(label: str):
        def compile_fn(graph: fx.GraphModule, inputs: list[Any]) -> Any:
            weights = args = None
            if config.approximate and label == "inference":   # the guard runs on the real example inputs
                weights, args = _bind_real_inputs(graph, example_inputs)
            compiled = compile_graph(graph, config, label=label, weights=weights, example_args=args, hold_weights=True)
            if on_compiled is not None:
                on_compiled(compiled)
            if warm_key is not None and label == "inference" and dynamo_cache.plain_inference(graph, example_inputs, gm):
                dynamo_cache.store(warm_key, compiled, config)
            if asked.approximate and not config.approximate and label == "forward":
                return make_boxed_func(_refusing_released(compiled, example_inputs))
            if label == "inference":
                return make_boxed_func(_weights_channels_last(compiled, compiled.gm))
            return make_boxed_func(compiled)

        return compile_fn

    def aot() -> Callable[..., Any]:
        return aot_autograd(
            fw_compiler=compiler("forward"),
            bw_compiler=compiler("backward"),
            inference_compiler=compiler("inference"),
            keep_inference_input_mutations=True,
        )(gm, example_inputs)

    if warm_key is None:
        return aot()
    with dynamo_cache.building(warm_key, config):   # ranks compiling the same graph: one compiles, the others reuse it
        hit = dynamo_cache.lookup(warm_key, config)
        return warm(hit) if hit is not None else aot()


def _approximate_config(config: Config, example_inputs: list[Any]) -> Config:
    """Approximate rewrites under torch.compile (fusion/approx/held.py): inference graphs only (a graph that
    records gradients is compiled exact, with one warning); a graph reading weights an earlier approximate
    compile released can only be compiled approximate, and for inference."""
    from fusion.store import dynamo_cache
    from fusion.approx import held

    released = [t for t in example_inputs if held.is_released(t)]
    training = dynamo_cache.records_gradients(example_inputs)
    if released and (training or not config.approximate):
        raise held.ReleasedWeightError(
            f"fusion: {len(released)} weight(s) of this module were converted by an earlier "
            "torch.compile(..., backend='fusion', options={'approximate': ...}) and their fp32 originals released; "
            "it can only run compiled that way, for inference (under torch.no_grad() or torch.inference_mode()). "
            "Load the fp32 weights into a fresh instance of the model for anything else.")
    if config.approximate and training:
        import warnings

        warnings.warn(
            "fusion: approximate rewrites (options={'approximate': ...}) apply to inference graphs; this graph "
            "records gradients, so it is compiled exact. Run the compiled model under torch.no_grad() or "
            "torch.inference_mode() to get them.", stacklevel=3)
        return config.replace(approximate=frozenset())
    return config


def _refusing_released(compiled: Any, example_inputs: list[Any]) -> Any:
    """The exact (gradient-recording) program of an approximate torch.compile: its weights may be released by
    a later inference compile of the same module, and Dynamo would still run it (its guards hold): it checks."""
    import torch

    from fusion.approx import held

    where = [i for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter)]

    def run(*args: Any) -> Any:
        if any(held.is_released(args[i]) for i in where if i < len(args)):
            raise held.ReleasedWeightError(
                "fusion: this module's weights were converted by an approximate torch.compile for inference and "
                "their fp32 originals released, so it cannot record gradients any more; run it under "
                "torch.no_grad() or torch.inference_mode(), or load the fp32 weights into a fresh instance")
        return compiled(*args)

    run.__wrapped__ = compiled   # type: ignore[attr-defined]
    return run


def _weights_channels_last(run: Callable[..., Any], program: fx.GraphModule) -> Callable[..., Any]:
    """`run`, which at its first call makes the parameters a channels-last program reads
    (fusion/passes/layout.py) channels-last in place. Not at compile time: Dynamo checks its guards on the
    frame it compiled, and they hold the weights' NCHW strides. After the first call those guards fail
    once: Dynamo retraces and the graph of channels-last weights compiles (its conversions are no-ops);
    until then the program converts them itself (correct either way)."""
    import torch

    from fusion.passes.layout import channels_last_weights, to_channels_last_

    names = set(channels_last_weights(program))
    if not names:
        return run
    at = [i for i, n in enumerate(n for n in program.graph.nodes if n.op == "placeholder") if n.name in names]
    pending = [True]

    def call(*args: Any) -> Any:
        if pending[0]:
            pending[0] = False
            to_channels_last_([args[i] for i in at if i < len(args) and isinstance(args[i], torch.nn.Parameter)])
        return run(*args)

    return call


def _bind_real_inputs(graph: fx.GraphModule, example_inputs: list[Any]) -> tuple[dict | None, list | None]:
    """(weights: placeholder -> Parameter, the real argument list) of AOTAutograd's inference graph, whose
    inputs are Dynamo's graph inputs in order (parameters lifted as inputs); (None, None) when they do not
    line up, and the graph is compiled exact."""
    import torch

    from fusion.approx import held
    from fusion.dialect.values import hint
    from fusion.errors import warn_fallback

    phs = [n for n in graph.graph.nodes if n.op == "placeholder"]

    def fits(n: fx.Node, real: Any) -> bool:
        v = n.meta.get("val")
        if isinstance(real, torch.Tensor):
            return isinstance(v, torch.Tensor) and v.dtype == real.dtype and v.dim() == real.dim()
        return not isinstance(v, torch.Tensor)

    if len(phs) != len(example_inputs) or not all(fits(n, r) for n, r in zip(phs, example_inputs)):
        if any(held.is_released(t) for t in example_inputs):
            raise held.ReleasedWeightError(
                "fusion: cannot match this graph's inputs to the weights an earlier approximate compile released")
        warn_fallback("approximate", "the inference graph's inputs do not line up with Dynamo's example inputs",
                      what_runs="the graph is compiled exact")
        return None, None
    weights = {n.name: t for n, t in zip(phs, example_inputs) if isinstance(t, torch.nn.Parameter)}
    # a symbolic size (dynamic shapes) arrives as a SymInt: the guard runs on its value in this example
    args = [hint(a) if isinstance(a, torch.SymInt) else a for a in example_inputs]
    return weights, args


def register() -> None:
    """Make backend="fusion" work even when the package is not installed (entry points missing)."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if any(ep.name == "fusion" for ep in entry_points(group="torch_dynamo_backends")):
        return  # installed: Dynamo loads us through the entry point (registering here too would clash)
    if "fusion" not in _COMPILER_FNS:
        register_backend(name="fusion")(fusion_backend)


