"""The structural cache: optimizing an architecture again (a new process, other weights) skips capture.

Capture (torch.export + decompositions) takes seconds on a large model — about 5 s for the 12-layer
LLaMA of bench/large_weights.py — and the compile cache behind it (rewritten graphs and kernels, keyed
by the captured graph) can only be consulted once capture is done. This cache is consulted before
capture. Its key is a *behavioural signature* of the module on the example inputs:

    forward runs once under FakeTensorMode — parameters, buffers and inputs replaced (torch.func.
    functional_call) by fake tensors of the same shapes, dtypes and strides, so no weight byte is read,
    copied or hashed — while a dispatch mode records every ATen op it calls: the op, where each tensor
    argument comes from (a parameter or buffer by name, an input by position, the output of an earlier
    op) and every other argument (eps, dims, scales, dtypes, ...).
    key = sha256(that trace, the output structure and which values it returns, name/shape/dtype/stride
                 of every parameter and buffer (export binds them all), the input specs, grad mode,
                 Config.key(), library and fusion source versions, the hardware profile)

An entry holds the compiled program as data (fusion/store/artifact.py: the lowered graph, kernel specs and
sources, the rewritten and captured graphs) plus how its placeholders bind (weights by name, inputs by
position) and the output structure. A hit rebuilds the program, binds the kernels from the kernel cache
and the live weights by name (no copy): no export, no e-graph, no scheduling, no code generation.

Why a hit is correct: the trace *is* the computation. Two modules with equal traces apply the same ATen
ops, with the same constants, to the same weights (by name) and inputs, so they compute the same function
of (weights, inputs) — whatever their classes, attributes, hooks or global flags — and the cached program
was compiled, exactly, from a module with that trace. Whatever changes the computation changes the trace:
an eps, a flag that changes forward's branches, a patched function, another attention implementation,
tied or untied weights. What the trace cannot see, torch.export cannot see either (both run forward on
fake tensors): Python that branches on tensor values raises under fake tensors, and then there is no key
and capture runs as usual. Checking the program against eager instead would cost a real forward pass —
5.4 s for that LLaMA on this machine, more than capture itself — and would read every weight.

Not cached (so always captured and compiled): approximate mode (it converts weights in place), forwards
that mutate buffers, inputs or module attributes, programs with lifted tensor constants, graphs lowered to
anything but C++ kernels, and programs in which any stage fell back. A stale, corrupted or unloadable
entry is deleted and the module is captured as usual (logged at debug level, no warning).
"""
from __future__ import annotations

import hashlib
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from fusion.store import cache
from fusion.capture import Captured
from fusion.config import Config
from fusion.pipeline import CompiledGraph, hardware

log = logging.getLogger("fusion.store.structural")

FORMAT = "fusion-structural/1"


def _meta(t: torch.Tensor) -> str:
    return f"<{tuple(t.shape)},{t.dtype},{t.stride()},{t.device.type},{int(t.requires_grad)}>"


class _Recorder(TorchDispatchMode):
    """Hashes the ATen ops forward calls; tensors are named by where they come from, never by their data."""

    def __init__(self, names: dict[int, str]):
        super().__init__()
        self.names = names
        self.keep: list[torch.Tensor] = []   # every tensor seen stays alive, so ids are not reused mid-trace
        self.hash = hashlib.sha256()
        self.count = 0
        self.mutates_state = False

    def token(self, a: Any) -> str:
        if isinstance(a, torch.Tensor):
            name = self.names.get(id(a))
            if name is None:  # made outside any op: torch.tensor(python data), a plain tensor attribute
                from torch._subclasses.fake_tensor import FakeTensor

                name = f"c{len(self.keep)}{_meta(a)}"
                if not isinstance(a, FakeTensor) and a.device.type == "cpu" and a.numel() <= 16:
                    name += repr(a.tolist())  # a literal written in forward: its value is part of the program
                self.names[id(a)] = name
                self.keep.append(a)
            return name
        if isinstance(a, (list, tuple)):
            return "[" + ",".join(self.token(x) for x in a) + "]"
        if isinstance(a, dict):
            return "{" + ",".join(f"{k}={self.token(v)}" for k, v in a.items()) + "}"
        if a is None or isinstance(a, (bool, int, float, str)):
            return repr(a)  # floats: repr round-trips exactly
        if isinstance(a, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return str(a)
        return type(a).__qualname__

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func.namespace == "prim":  # metadata queries (.device), not computation
            return func(*args, **kwargs)
        call = f"{func}({self.token(list(args))};{self.token(kwargs)})\n"
        if func._schema.is_mutable and any(self.names.get(id(t), "v")[0] in "wi" for t in pytree.tree_leaves((args, kwargs))
                                           if isinstance(t, torch.Tensor)):
            self.mutates_state = True  # writes a weight, buffer or input: export would record a mutation
        out = func(*args, **kwargs)
        for t in (out,) if isinstance(out, torch.Tensor) else pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t) not in self.names:
                self.names[id(t)] = f"v{self.count}"
                self.count += 1
                self.keep.append(t)
        self.hash.update(call.encode())
        return out


def _attributes(model: torch.nn.Module) -> dict:
    """Identity of every plain attribute of every submodule (to notice forward assigning to one)."""
    skip = {"_parameters", "_buffers", "_modules"}
    return {(i, k): v for i, m in enumerate(model.modules()) for k, v in vars(m).items() if k not in skip}


#: the passes an entry was compiled by. Replacing one at run time (tests inject faults and wrong passes this
#: way) changes the compiler without changing its sources (which `cache.versions()` hashes), so then the
#: structural cache is bypassed: nothing is looked up or stored.
_PASSES = {
    "fusion.api": ("capture_module", "compile_graph"),
    "fusion.pipeline": ("normalize", "prepare", "compile_graph", "_rewrite", "_approximate", "hardware"),
    "fusion.rewrite": ("rewrite",),
    "fusion.lower": ("plan_kernels", "bind_kernels", "kernel_irs"),
    "fusion.backends.cpp": ("build",),
    "fusion.lower.schedule": ("schedule",),
    "fusion.backends.cpp.compiler": ("build",),
}


def stock_passes() -> bool:
    """True when every pass is the function its package defines (none replaced at run time)."""
    for mod, attrs in _PASSES.items():
        if mod not in sys.modules:
            continue  # not imported yet, so not replaced
        m = sys.modules[mod]
        if m is None:  # made unimportable
            return False
        for attr in attrs:
            fn = getattr(m, attr, None)
            if fn is not None and (getattr(fn, "__module__", None) or "").split(".")[0] != "fusion":
                return False
    return True


def compile_environment(config: Config) -> list[str]:
    """What a stored program depends on besides its computation, as key parts: library and fusion source
    versions, the config, grad mode and the hardware profile (extraction and scheduling price with it: a
    re-calibration recompiles). Shared by this cache and torch.compile's (fusion/store/dynamo_cache.py)."""
    with warnings.catch_warnings():  # a failing calibration is reported once, by the compile that needs it
        warnings.simplefilter("ignore")
        hw = hardware(config)
    return [cache.versions(), config.key(), f"grad={torch.is_grad_enabled()}", cache.profile_identity(hw)]


def signature(model: torch.nn.Module, args: Sequence[Any], config: Config) -> str | None:
    """The structural-cache key of `model` on `args` (see the module docstring), or None when the module
    cannot be cached or the structural cache is off."""
    if not config.structural_cache or config.approximate or not stock_passes():
        return None
    from torch._subclasses.fake_tensor import FakeTensorMode

    t0 = time.perf_counter()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    names: dict[int, str] = {}
    fakes: dict[int, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    parts = [FORMAT, *compile_environment(config)]
    try:
        for kind, named in (("param", model.named_parameters(remove_duplicate=False)),
                            ("buffer", model.named_buffers(remove_duplicate=False))):
            for name, t in named:
                if id(t) not in fakes:  # metadata only: from_tensor never reads the data
                    fakes[id(t)] = mode.from_tensor(t)
                    names[id(fakes[id(t)])] = f"w:{name}"
                state[name] = fakes[id(t)]
                parts.append(f"{kind} {name} -> {names[id(state[name])]} {_meta(t)}")  # tied weights share a name
        flat, spec = pytree.tree_flatten(tuple(args))
        fake_flat = []
        for i, x in enumerate(flat):
            if isinstance(x, torch.Tensor):
                if id(x) not in fakes:
                    fakes[id(x)] = mode.from_tensor(x)
                    names[id(fakes[id(x)])] = f"in{i}"
                fake_flat.append(fakes[id(x)])
                parts.append(f"input {i} -> {names[id(fakes[id(x)])]} {_meta(x)}")
            else:
                fake_flat.append(x)
                parts.append(f"input {i} = {type(x).__qualname__}:{x!r}")
        parts.append(f"inputs {spec}")
        before = _attributes(model)
        rec = _Recorder(names)
        with mode, rec:
            out = torch.func.functional_call(model, state, tuple(pytree.tree_unflatten(fake_flat, spec)))
        after = _attributes(model)
        if after.keys() != before.keys() or any(after[k] is not v for k, v in before.items()):
            _restore_attributes(model, before, after)
            log.debug("structural cache: forward assigned module attributes; not cached")
            return None
        if rec.mutates_state:
            log.debug("structural cache: forward mutates weights, buffers or inputs; not cached")
            return None
        leaves, out_spec = pytree.tree_flatten(out)
        parts.append(f"ops {rec.count} {rec.hash.hexdigest()}")
        parts.append(f"output {out_spec} " + ",".join(rec.token(x) for x in leaves))
    except Exception as e:  # noqa: BLE001 - a module we cannot trace on fake tensors is simply not cached
        log.debug("structural cache: no signature (%s: %s)", type(e).__name__, e)
        return None
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    log.debug("structural cache: signature %s in %.3f s", key[:16], time.perf_counter() - t0)
    return key


def _restore_attributes(model: torch.nn.Module, before: dict, after: dict) -> None:
    mods = list(model.modules())
    for (i, k) in after.keys() - before.keys():
        delattr(mods[i], k)
    for (i, k), v in before.items():
        if after.get((i, k)) is not v:
            object.__setattr__(mods[i], k, v)


def _path(key: str, config: Config) -> Path:
    return cache.subdir("modules", config.cache_dir) / f"{key}.json"


def building(key: str, config: Config) -> Any:
    """The lock a process holds while it compiles the program for `key` (fusion.store.cache.exclusive)."""
    return cache.exclusive(_path(key, config))


@dataclass
class Hit:
    captured: Captured     # bindings and output structure (no graph, no ExportedProgram: nothing was captured)
    graph: CompiledGraph


def lookup(key: str | None, model: torch.nn.Module, config: Config) -> Hit | None:
    """The cached program for `key`, rebuilt and ready to bind `model`'s weights; None on a miss."""
    if key is None:
        return None
    path = _path(key, config)
    entry = cache.read_json(path)  # None when missing, truncated or corrupted
    if entry is None:
        return None
    from fusion.store import artifact

    try:
        if entry.get("format") != FORMAT:
            raise ValueError(f"entry format {entry.get('format')!r}")
        bindings = [tuple(b) for b in entry["bindings"]]
        weights = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        weights |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
        missing = [name for kind, name in bindings if kind != "user" and name not in weights]
        if missing:
            raise KeyError(f"weights {missing[:3]} not on the module")
        graph = artifact.restore(entry["artifact"], entry["sources"], config, how="structural cache")
        captured = Captured(None, None, bindings, {}, entry["num_user_outputs"], artifact.load_spec(entry["out_spec"]))
    except Exception as e:  # noqa: BLE001 - an entry we cannot use is dropped; capture runs as usual
        log.debug("structural cache: dropping entry %s (%s: %s)", path.name, type(e).__name__, e)
        path.unlink(missing_ok=True)
        return None
    return Hit(captured, graph)


def store(key: str | None, captured: Captured, graph: CompiledGraph, config: Config) -> bool:
    """Write the entry for `key` if this program can be reused as it is; never raises."""
    if key is None or graph.log.fallbacks or graph.log.approx is not None or captured.buffer_mutations:
        return False
    if any(kind not in ("param", "buffer", "user") for kind, _ in captured.input_bindings):
        return False  # lifted constants: their values live in the capture, not in the module
    from fusion.store import artifact

    try:
        dumped = artifact.dump(graph)
        if dumped is None:
            return False
        data, sources = dumped
        entry = {"format": FORMAT, "artifact": data, "sources": sources,
                 "bindings": [list(b) for b in captured.input_bindings],
                 "num_user_outputs": captured.num_user_outputs, "out_spec": artifact.dump_spec(captured.out_spec)}
        cache.write_json(_path(key, config), entry)
        return True
    except Exception as e:  # noqa: BLE001 - not caching is always correct
        log.debug("structural cache: not stored (%s: %s)", type(e).__name__, e)
        return False
