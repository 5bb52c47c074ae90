"""`torch.compile(model, backend="fusion")`: Dynamo captures, AOTAutograd splits forward and backward
into ATen graphs, and each graph goes through `pipeline.compile_graph`.

Registered through the `torch_dynamo_backends` entry point (pyproject.toml) and, as a safety net for
un-installed checkouts, by `import fusion`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping


import torch.fx as fx

from fusion.config import Config


def fusion_backend(gm: fx.GraphModule, example_inputs: list[Any], options: Mapping[str, Any] | Config | None = None,
                   on_compiled: Callable[[Any], None] | None = None, **_ignored: Any) -> Any:
    """A Dynamo backend. `options` are `fusion.Config` fields, e.g. `options={"approximate": {"bf16"}}`.

    `on_compiled(compiled_graph)` is called for every graph compiled (fusion.optimize collects them).
    """
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from fusion import dynamo_cache
    from fusion.pipeline import compile_graph, remember

    config = Config.from_options(options)
    if config.approximate:
        import warnings

        warnings.warn(
            "fusion: approximate rewrites (Config.approximate) are applied by fusion.optimize(model, example_inputs, "
            "config=...) only; through torch.compile they are ignored and the program is exact. They convert the "
            "model's weights in place (int8/bf16), which would invalidate torch.compile's guards on those weights.",
            stacklevel=2)
        config = config.replace(approximate=frozenset())

    # warm path: an inference graph compiled before runs its stored program, without AOTAutograd
    try:
        warm_key = dynamo_cache.key(gm, example_inputs, config)
        hit = dynamo_cache.lookup(warm_key, config) if warm_key is not None else None
    except Exception:  # noqa: BLE001 - the cache is an optimisation: compile the usual way
        warm_key, hit = None, None
    if hit is not None:
        if on_compiled is not None:
            on_compiled(hit)
        return dynamo_cache.runner(remember(hit))

    def compiler(label: str):
        def compile_fn(graph: fx.GraphModule, inputs: list[Any]) -> Any:
            compiled = compile_graph(graph, config, label=label)
            if on_compiled is not None:
                on_compiled(compiled)
            if warm_key is not None and label == "inference" and dynamo_cache.plain_inference(graph, example_inputs, gm):
                dynamo_cache.store(warm_key, compiled, config)
            return make_boxed_func(compiled)

        return compile_fn

    return aot_autograd(
        fw_compiler=compiler("forward"),
        bw_compiler=compiler("backward"),
        inference_compiler=compiler("inference"),
        keep_inference_input_mutations=True,
    )(gm, example_inputs)


def register() -> None:
    """Make backend="fusion" work even when the package is not installed (entry points missing)."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if any(ep.name == "fusion" for ep in entry_points(group="torch_dynamo_backends")):
        return  # installed: Dynamo loads us through the entry point (registering here too would clash)
    if "fusion" not in _COMPILER_FNS:
        register_backend(name="fusion")(fusion_backend)


