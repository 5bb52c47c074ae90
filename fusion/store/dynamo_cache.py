"""The warm path of `torch.compile(backend="fusion")`: a Dynamo graph compiled before skips AOTAutograd.

Dynamo hands the backend a Python-level FX graph. Compiling it means AOTAutograd's trace to ATen
(functionalization, metadata analysis: ~0.5 s for a 4-layer BERT) and then our passes; the rewrite and
kernel caches make the passes cheap the second time, but the trace would still run every time. Inductor
skips it with its own AOTAutograd cache. This is ours, for inference graphs:

    key = sha256(FORMAT, the Dynamo graph's code, each input's kind/shape/stride/dtype/device/requires_grad,
                 grad mode, Config.key(), library + fusion source versions, the hardware profile)

An entry is the compiled program as data (fusion/store/artifact.py: lowered graph, kernel specs and C++
sources — no weight data, weights stay placeholders). A hit restores it and the backend returns a
function that calls it with Dynamo's arguments directly.

Why calling it directly is correct: AOTAutograd's inference wrapper is the identity on arguments and
results when (checked on the compile that writes the entry, from AOTAutograd's own metadata) no input
is mutated, no output aliases an input or an intermediate, there are no effect tokens or tensor
subclasses, and the ATen graph takes exactly Dynamo's arguments and returns exactly Dynamo's outputs.
Entries are written only then.

Why the key is enough: the graph's code is the computation with every constant written out, and
Dynamo's own guards (shapes, dtypes, grad mode, ...) decide when the graph is reused. Graphs the code
cannot fully describe are never cached: graph constants (`get_attr`), submodule calls, and calls of
functions outside torch and the standard operators (a user function could change under the same name).
Not cached either: training graphs (AOTAutograd's joint graph), symbolic shapes, approximate mode,
programs in which any stage fell back, and programs artifact.dump cannot store.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx

from fusion.store import cache
from fusion.config import Config

log = logging.getLogger(__name__)
FORMAT = "fusion-dynamo/1"


def _trusted(target: Any) -> bool:
    """A call target whose behaviour its name fixes: torch's own functions and the standard operators."""
    if isinstance(target, str):
        return True  # call_method: a Tensor method by name
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return True
    module = getattr(target, "__module__", None) or ""
    return module in ("_operator", "operator", "builtins", "math") or module == "torch" or module.startswith("torch.")


def _input_meta(x: Any) -> str | None:
    if not isinstance(x, torch.Tensor):
        return None  # SymInts and Python scalars: dynamic shapes, not cached
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if x.layout != torch.strided or is_traceable_wrapper_subclass(x) or any(
            not isinstance(s, int) for s in (*x.shape, *x.stride())):
        return None
    return f"{type(x).__name__} {tuple(x.shape)} {x.stride()} {x.storage_offset()} {x.dtype} {x.device} {x.requires_grad}"


def records_gradients(example_inputs: list[Any]) -> bool:
    """Does AOTAutograd trace a joint forward/backward graph for these inputs (rather than an inference graph)?"""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


def key(gm: fx.GraphModule, example_inputs: list[Any], config: Config) -> str | None:
    """The cache key of Dynamo's graph on these inputs, or None when it must not be cached."""
    from fusion.store.structural import compile_environment, stock_passes

    if config.approximate or not config.structural_cache or not stock_passes():
        return None  # (a pass replaced at run time — a test, a fault injection — is not what was stored)
    if records_gradients(example_inputs):
        return None  # AOTAutograd builds a joint forward/backward graph: not this cache
    if len({id(x) for x in example_inputs}) != len(example_inputs):
        return None  # the same tensor passed twice: AOTAutograd deduplicates arguments
    for n in gm.graph.nodes:
        if n.op in ("get_attr", "call_module") or (n.op == "call_function" and not _trusted(n.target)):
            return None
    metas = [_input_meta(x) for x in example_inputs]
    if any(m is None for m in metas):
        return None
    parts = [FORMAT, *compile_environment(config), gm.code, *metas]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def plain_inference(graph: fx.GraphModule, example_inputs: list[Any], dynamo_gm: fx.GraphModule) -> bool:
    """Inside AOTAutograd's inference compiler: is its wrapper the identity for this graph?"""
    from torch._functorch._aot_autograd.schemas import OutputType

    ctx = torch._guards.TracingContext.try_get()
    meta = getattr(ctx, "fw_metadata", None)
    if meta is None:
        return False
    if any(i.mutates_data or i.mutates_metadata or i.mutates_storage_metadata for i in meta.input_info):
        return False
    if any(o.output_type != OutputType.non_alias for o in meta.output_info):
        return False
    if meta.num_intermediate_bases or meta.tokens:
        return False
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    aten_out = graph.graph.output_node().args[0]
    dynamo_out = dynamo_gm.graph.output_node().args[0]
    return (len(placeholders) == len(example_inputs) and isinstance(dynamo_out, tuple | list)
            and isinstance(aten_out, tuple | list) and len(aten_out) == len(dynamo_out))


def _path(k: str, config: Config) -> Path:
    return cache.subdir("dynamo", config.cache_dir) / f"{k}.json"


def building(k: str, config: Config) -> Any:
    """The lock a process holds while it compiles the graph of key `k` (fusion.store.cache.exclusive)."""
    return cache.exclusive(_path(k, config))


def store(k: str, compiled: Any, config: Config) -> bool:
    """Write the entry; never raises (not caching is always correct)."""
    if compiled.log.fallbacks or compiled.log.approx is not None:
        return False
    from fusion.store import artifact

    try:
        dumped = artifact.dump(compiled)
        if dumped is None:
            return False
        data, sources = dumped
        cache.write_json(_path(k, config), {"format": FORMAT, "artifact": data, "sources": sources})
        return True
    except Exception as e:  # noqa: BLE001
        log.debug("dynamo cache: not stored (%s: %s)", type(e).__name__, e)
        return False


def lookup(k: str, config: Config) -> Any | None:
    """The compiled program stored under `k`, restored; None on a miss (a bad entry is deleted)."""
    path = _path(k, config)
    entry = cache.read_json(path)
    if entry is None:
        return None
    from fusion.store import artifact

    try:
        if entry.get("format") != FORMAT:
            raise ValueError(f"entry format {entry.get('format')!r}")
        return artifact.restore(entry["artifact"], entry["sources"], config, how="dynamo cache")
    except Exception as e:  # noqa: BLE001
        log.debug("dynamo cache: dropping entry %s (%s: %s)", path.name, type(e).__name__, e)
        path.unlink(missing_ok=True)
        return None


def runner(compiled: Any) -> Callable[..., Any]:
    """What the backend returns on a hit: Dynamo's arguments in, Dynamo's output tuple out."""

    def run(*args: Any) -> Any:
        return tuple(compiled(*args))

    run.compiled = compiled  # type: ignore[attr-defined]
    return run


