"""Automatic dynamic shapes for `fusion.optimize`: after a second input shape, capture once with symbols.

torch.export specialises a graph to the example shapes. `fusion.optimize` compiled one more static graph
for every new shape, so a model called with growing sequence lengths was captured, saturated, extracted
and built again each time (and extraction could choose differently per shape). Like Dynamo's automatic
dynamic shapes, the second shape that differs only in sizes is captured once more with the differing
dims marked `Dim.AUTO`; the graph's kernels take those sizes at run time, and later calls match the
`ShapePattern` read back from the captured graph (symbols, their ranges, relations between inputs).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import sympy
import torch
import torch.utils._pytree as pytree


def leaves(args: Sequence[Any], kwargs: dict[str, Any]) -> list[Any]:
    return pytree.tree_leaves((tuple(args), kwargs))


def _structure(x: Any) -> Any:
    """What must be equal for two inputs to share one symbolic graph: everything but tensor sizes."""
    if isinstance(x, torch.Tensor):
        return ("tensor", x.dim(), x.dtype, x.device.type, x.requires_grad)
    return (type(x).__name__, repr(x)[:64])


def differing_dims(first: Sequence[Any], now: Sequence[Any]) -> list[set[int]] | None:
    """Per user leaf, the dims whose size differs between two calls; None when the calls differ in anything
    else (leaf count, rank, dtype, device, a non-tensor value) or in no size at all."""
    if len(first) != len(now) or any(_structure(a) != _structure(b) for a, b in zip(first, now)):
        return None
    dims = [{d for d, (p, q) in enumerate(zip(a.shape, b.shape)) if p != q} if isinstance(a, torch.Tensor) else set()
            for a, b in zip(first, now)]
    return dims if any(dims) else None


def dynamic_shapes_spec(model: torch.nn.Module, args: Sequence[Any], dims: list[set[int]]) -> tuple[Any, ...]:
    """torch.export's `dynamic_shapes` for `model.forward(*args)`: {dim: Dim.AUTO} for each marked dim of a
    tensor leaf, None elsewhere, in the nesting of `args` (a `*args` parameter takes the rest as one tuple)."""
    flat, spec = pytree.tree_flatten(tuple(args))
    if len(flat) != len(dims):
        raise ValueError(f"{len(dims)} dim sets for {len(flat)} input leaves")
    per_leaf = [({d: torch.export.Dim.AUTO for d in sorted(ds)} if isinstance(x, torch.Tensor) and ds else None)
                for x, ds in zip(flat, dims)]
    per_arg = list(pytree.tree_unflatten(per_leaf, spec))
    params = list(inspect.signature(model.forward).parameters.values())
    for i, p in enumerate(params[:len(per_arg)]):
        if p.kind is p.VAR_POSITIONAL:
            return (*per_arg[:i], tuple(per_arg[i:]))
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
    return tuple(per_arg)


@dataclass(frozen=True)
class ShapePattern:
    """What a symbolic capture accepts: per user leaf its structure and sizes (an int, or a sympy expression
    over the graph's size symbols), and each symbol's range. Sizes that export specialised are plain ints."""

    structure: tuple[Any, ...]
    sizes: tuple[tuple[Any, ...] | None, ...]
    ranges: tuple[tuple[sympy.Symbol, int, float], ...]

    @staticmethod
    def of(user_vals: Sequence[Any], example_leaves: Sequence[Any], range_constraints: dict[Any, Any]) -> "ShapePattern":
        """The pattern of a capture whose user placeholders carry `user_vals` (fake tensors, symbolic sizes)."""
        sizes = []
        for val, leaf in zip(user_vals, example_leaves):
            if isinstance(leaf, torch.Tensor) and isinstance(val, torch.Tensor):
                sizes.append(tuple(s.node.expr if isinstance(s, torch.SymInt) else int(s) for s in val.shape))
            else:
                sizes.append(None)
        ranges = []
        for sym, vr in range_constraints.items():
            if isinstance(sym, sympy.Symbol):
                lo, hi = vr.lower, vr.upper
                ranges.append((sym, int(lo) if lo.is_finite else 0, float(hi) if hi.is_finite else float("inf")))
        return ShapePattern(tuple(_structure(x) for x in example_leaves), tuple(sizes), tuple(ranges))

    @property
    def symbolic(self) -> bool:
        return any(not isinstance(s, int) for sz in self.sizes if sz for s in sz)

    def matches(self, now: Sequence[Any]) -> bool:
        """Whether the graph captured for this pattern computes the model on inputs `now`."""
        if len(now) != len(self.structure) or any(_structure(x) != s for x, s in zip(now, self.structure)):
            return False
        binding: dict[sympy.Symbol, int] = {}
        derived = []
        for x, sz in zip(now, self.sizes):
            if sz is None:
                continue
            for want, got in zip(sz, x.shape):
                if isinstance(want, int):
                    if want != got:
                        return False
                elif isinstance(want, sympy.Symbol):
                    if binding.setdefault(want, int(got)) != int(got):
                        return False  # two dims export found equal differ now
                else:
                    derived.append((want, int(got)))
        for sym, lo, hi in self.ranges:
            if sym in binding and not lo <= binding[sym] <= hi:
                return False
        for expr, got in derived:
            value = expr.subs(binding)
            if not value.is_number or int(value) != got:
                return False
        return True
