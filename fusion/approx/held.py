"""Weights converted for a `torch.compile(backend="fusion", options={"approximate": ...})` program.

Under `fusion.optimize` the approximate pass converts a weight IN PLACE (``p.data = int8``): the module's
Parameter becomes int8/bf16. Under torch.compile that cannot work: Dynamo guards every Parameter it lifts
into the graph (TENSOR_MATCH: dtype, device, shape, strides, requires_grad), so a dtype change makes the
next call recompile — and the recompiled trace runs the model's Python (``F.linear``) on int8 weights.

So the compiled program HOLDS the converted weight (a buffer of its GraphModule, read with ``get_attr``;
the Parameter's placeholder stays, unused), and the fp32 original is RELEASED: its storage is replaced by
an untouched anonymous private mapping of the same size (`release_`). Shape, dtype, strides, device and
requires_grad — all the guards check — are unchanged: no recompile, and the fp32 memory is freed (pages
of a mapping never written are not resident). Unlike ``untyped_storage().resize_(0)`` (FSDP's way), a
released tensor is still valid memory: printing it or adding to it does not crash the process (a storage
of size 0 under a non-empty tensor segfaults in several kernels); it reads zeros.

Zeros are not the model, so eager use must fail clearly instead: every module owning a released
Parameter gets a forward pre-hook and a state_dict pre-hook that raise `ReleasedWeightError` (naming the
weights and what to do). The hooks do nothing while Dynamo traces (``torch.compiler.is_compiling()``) and
compiled code never calls them (Dynamo does not guard on hooks added after compiling:
``torch._dynamo.config.skip_nnmodule_hook_guards``), so the compiled module runs as before.

`REGISTRY` (weak keys: the Parameter objects) maps a released Parameter to its converted form, so a
recompile of the same module (new shapes, a graph break) reuses the converted weight instead of reading
the released fp32 one (`fusion.approx.apply_approximations` forces those sites). A Parameter that a
compiled approximate program reads as fp32 (the guard kept it exact) is `pin`-ned: a later compile never
converts it, since that would release memory an existing program still reads.

The fp32 model does not come back from a released module: load the fp32 weights into a fresh instance
(``Model.from_pretrained(...)`` / ``load_state_dict`` on a new module).
"""
from __future__ import annotations

import gc
import mmap
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["Held", "ReleasedWeightError", "REGISTRY", "lookup", "is_released", "release_", "pin", "is_pinned",
           "guard_modules"]


class ReleasedWeightError(RuntimeError):
    """A module whose fp32 weights were released by an approximate torch.compile was used eagerly."""


@dataclass
class Held:
    tag: str                       # "int8" | "bf16"
    kn: Optional[bool]             # int8: the layout the per-channel scales were computed for ([K,N] or [N,K])
    weight: torch.Tensor           # the converted weight (int8 or bf16), same shape as the Parameter
    scale: Optional[torch.Tensor]  # int8: per-output-channel scales (fp32 [N])


#: released Parameter -> its converted form (weak keys by identity: a Parameter that dies takes its entry with it;
#: weakref.WeakKeyDictionary would compare tensors with `==`)
REGISTRY: WeakIdKeyDictionary = WeakIdKeyDictionary()
_PINNED: WeakIdKeyDictionary = WeakIdKeyDictionary()     # Parameter -> True
_GUARDED: WeakIdKeyDictionary = WeakIdKeyDictionary()    # module -> its hook handles


def lookup(t: torch.Tensor) -> Optional[Held]:
    return REGISTRY.get(t) if isinstance(t, torch.Tensor) else None


def is_released(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t in REGISTRY


def pin(t: torch.Tensor) -> None:
    """`t` is read as fp32 by a compiled approximate program: never convert (release) it later."""
    _PINNED[t] = True


def is_pinned(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t in _PINNED


def convert(t: torch.Tensor, tag: str, kn: bool = False) -> Held:
    """The converted form of the live fp32 weight `t` (a new tensor; `t` is untouched)."""
    from fusion.approx import ops as approx_ops

    with torch.no_grad():
        if tag == "int8":
            q, s = approx_ops._quantize_weight(t, kn)
            return Held("int8", kn, q, s)
        if tag == "bf16":
            return Held("bf16", None, t.detach().to(torch.bfloat16), None)
    raise ValueError(tag)


def release_(t: torch.Tensor, held: Held) -> None:
    """Free `t`'s fp32 memory, keeping every property Dynamo guards on, and record its converted form."""
    if t in REGISTRY:
        return
    nbytes = t.untyped_storage().nbytes()
    if t.numel() and nbytes:
        # an anonymous private mapping: no page is resident until written; reads see the zero page
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
        storage = torch.frombuffer(buf, dtype=torch.uint8).untyped_storage()   # the tensor keeps `buf` alive
        empty = torch.empty(0, dtype=t.dtype, device=t.device)
        with torch.no_grad():
            empty.set_(storage, t.storage_offset(), t.shape, t.stride())
            t.data = empty
    REGISTRY[t] = held


def guard_modules(params: list[torch.Tensor]) -> int:
    """Hooks on the modules owning the released `params` so that eager use raises `ReleasedWeightError`.

    The owners are found by one scan of the live objects (the backend sees Parameters, not modules).
    Returns the number of modules newly guarded."""
    ids = {id(p) for p in params}
    if not ids:
        return 0
    n = 0
    with warnings.catch_warnings():   # isinstance() on some deprecated module-level proxies warns
        warnings.simplefilter("ignore")
        modules = [o for o in gc.get_objects() if _is_module(o)]
    for obj in modules:
        if obj in _GUARDED:
            continue
        own = getattr(obj, "_parameters", None)
        if not own or not any(id(p) in ids for p in own.values() if p is not None):
            continue
        _GUARDED[obj] = [obj.register_forward_pre_hook(_forward_guard),
                         obj.register_state_dict_pre_hook(_state_dict_guard)]
        n += 1
    return n


def _is_module(o: object) -> bool:
    try:
        return isinstance(o, torch.nn.Module)
    except ReferenceError:   # a weakref.proxy whose referent is gone
        return False


def _released_names(module: torch.nn.Module) -> list[str]:
    return [name for name, p in module._parameters.items() if p is not None and p in REGISTRY]


def _raise(module: torch.nn.Module, what: str) -> None:
    names = _released_names(module)
    if not names:
        return
    kinds = sorted({REGISTRY[module._parameters[n]].tag for n in names})
    raise ReleasedWeightError(
        f"fusion: cannot {what} {type(module).__name__}: its parameter(s) {names} were converted to "
        f"{'/'.join(kinds)} by torch.compile(..., backend='fusion', options={{'approximate': ...}}) and the fp32 "
        "originals released (their memory freed; the tensors now read zeros). Call the compiled module instead, "
        "or load the fp32 weights into a fresh instance of the model.")


def _forward_guard(module: torch.nn.Module, args: tuple) -> None:
    if torch.compiler.is_compiling():   # Dynamo traces this as a no-op; compiled code never calls it
        return None
    _raise(module, "run")
    return None


def _state_dict_guard(module: torch.nn.Module, prefix: str, keep_vars: bool) -> None:
    if torch.compiler.is_compiling():
        return None
    _raise(module, "save the state_dict of")
    return None
