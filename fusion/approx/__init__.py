"""Approximate rewrites: opt-in (``Config.approximate``), measured, guarded, reverted when harmful.

    result = apply_approximations(gm, config, weights, example_args)

runs after the exact rewrite stage and before lowering, only when ``config.approximate`` is non-empty.
``gm`` is a fusion-dialect graph; ``weights`` maps weight placeholder name -> the LIVE tensor the caller
passes for it at every call (the module's own Parameter/buffer objects); ``example_args`` is the full flat
argument list of ``gm`` (weights included).

Rules (see `rules.py`): ``int8`` (dynamic W8A8 linears: per-token activation scales, per-channel weight
scales, ``torch._int_mm``; or weight-only int8 where that times faster), ``bf16`` (matmuls in bf16, fp32
around them), ``relu_attention`` (softmax over keys -> relu(s)/L: exact only for models trained with it).

How it works (the pass, `guard.py`; the standalone entry points below):

1. Find sites on the exact graph.
2. Measure: run the exact graph once (fx.Interpreter); at each site's anchor also run the site's
   replacement on the exact inputs -> the site's *local* error. Then run the approximate program with all
   sites in its *staged* form: weight transforms (``fusion.quantize_weight_int8(W)``, ``_to_copy(W, bf16)``)
   are ordinary graph nodes, so the staged program reads the fp32 weights and materialises one layer's
   converted weight at a time (FX frees it after its last use): peak memory stays fp32 weights + one layer,
   and the original weights are untouched until the guard is done.
3. Guard: the error of an output is ``max|a-b| / max|b|`` (also reported: cosine similarity). While the worst
   output error exceeds ``config.tolerance``, revert the most harmful remaining site — harm is *measured*:
   the output error of the program with that site alone applied (measured only if the guard trips: first for
   the `MAX_SOLO_MEASUREMENTS` sites of largest local error; a site not measured is ranked by its local error
   times the median ratio of measured harm to local error, and measured too when that estimate leads, up to
   3 x `MAX_SOLO_MEASUREMENTS` measurements) — and measure again. Cost: 2 program runs when nothing is
   reverted; otherwise the solo measurements + one per revert.
4. Commit: fold every weight transform whose placeholder feeds only transforms of one kind, converting the
   LIVE weight tensor IN PLACE, layer by layer (``t.data = converted``; the fp32 storage is freed as soon as
   it is converted, when nothing else holds it): int8 weights (same shape, dtype int8) keep their
   placeholder; their per-channel scales (N floats) become small buffers on the returned GraphModule read
   with ``get_attr`` (named ``_approx_scale_<placeholder>``); bf16 weights keep their placeholder.
   Placeholder order and names never change; placeholder ``meta["val"]`` is updated to the new dtype.
5. Fuse (`fuse.py`): identical views and activation conversions merged, GELU and the next linear's
   quantization / bf16 cast folded into the GEMM epilogues (values change only by rounding).

Consequences the caller must respect (documented contract):
- after an int8/bf16 commit the live weights ARE int8/bf16: the original module no longer runs eagerly
  with them, and the *exact* graph is no longer a valid fallback — fall back to ``result.gm`` (it runs
  eagerly through torch kernels) instead. Parameters converted to int8 get ``requires_grad=False``.
- the runtime must pass the same tensor objects as ``weights`` (binding by name, as `OptimizedModule`
  does); the int8 and bf16 linear ops raise a clear error if they are handed a float weight.
- ``hold_weights=True`` (torch.compile, `held.py`): weights keep their dtype; the program holds the converted
  ones and the fp32 originals are released (same metadata, memory freed); eager use of their modules raises.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.utils._pytree as pytree

# the package face: the pass and its helpers live in guard.py (the names below were always importable from here)
from fusion.approx.guard import (MAX_SOLO_MEASUREMENTS, ApproxResult, ApproxSite, apply_approximations, build,  # noqa: F401
                                 commit, convert_weight_, output_errors)
from fusion.approx.held import ReleasedWeightError  # noqa: F401
from fusion.approx.rules import RELU_NOTE, Emitter, Site, find_sites  # noqa: F401 (re-exported)
from fusion.config import Config

__all__ = ["ApproxSite", "ApproxResult", "apply_approximations", "optimize_approx", "ApproxModule", "output_errors"]


# ----------------------------------------------------------------------------------------------
# standalone use (until the driver calls the pass; also handy in notebooks and benchmarks)


class ApproxModule(torch.nn.Module):
    """Runs an approximated exported graph; weights are looked up BY NAME on the original module per call."""

    def __init__(self, model: torch.nn.Module, captured: Any, result: ApproxResult):
        super().__init__()
        self.original = model
        self.captured = captured
        self.result = result
        self.gm = result.gm
        self._accessors = [_accessor(model, captured, k, n) for k, n in captured.input_bindings]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        user = iter(pytree.tree_leaves((tuple(args), kwargs)))
        flat = [next(user) if acc is None else acc() for acc in self._accessors]
        with torch.no_grad():
            outs = self.gm(*flat)
        cap = self.captured
        if cap.buffer_mutations:
            outs = [o for i, o in enumerate(outs) if i not in cap.buffer_mutations]
        return pytree.tree_unflatten(list(outs), cap.program.call_spec.out_spec)


def _accessor(model: torch.nn.Module, captured: Any, kind: str, name: str) -> Any:
    if kind == "user":
        return None
    if kind == "constant":
        value = captured.program.constants[name]
        return lambda: value
    owner_path, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    return lambda: getattr(owner, attr)


def bind(model: torch.nn.Module, captured: Any, example_inputs: Sequence[Any]) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """(weights by placeholder name, full flat argument list) for an exported graph of `model`."""
    phs = [n.name for n in captured.gm.graph.nodes if n.op == "placeholder"]
    user = iter(pytree.tree_leaves((tuple(example_inputs), {})))
    weights: dict[str, torch.Tensor] = {}
    flat: list[Any] = []
    for ph, (kind, name) in zip(phs, captured.input_bindings):
        acc = _accessor(model, captured, kind, name)
        if acc is None:
            flat.append(next(user))
        else:
            t = acc()
            flat.append(t)
            if kind in ("param", "buffer") and isinstance(t, torch.Tensor):
                weights[ph] = t
    return weights, flat


def optimize_approx(model: torch.nn.Module, example_inputs: Sequence[Any], config: Config, *,
                    metric: Optional[Callable[[Any, Any], tuple[float, float]]] = None) -> ApproxModule:
    """Capture `model` (torch.export), apply the approximations of `config`, return a runnable module.

    No exact rewrites and no lowering happen here: this is the approximation pass on its own. NOTE: int8 and
    bf16 convert `model`'s weights in place (the model itself no longer runs eagerly afterwards)."""
    from fusion.capture import capture_module

    captured = capture_module(model, tuple(example_inputs))
    weights, flat = bind(model, captured, example_inputs)
    result = apply_approximations(captured.gm, config, weights, flat, metric=metric)
    return ApproxModule(model, captured, result)
