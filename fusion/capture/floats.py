"""Dynamo's unspecialised floats, specialised again with a guard (torch.compile's path only).

Under `dynamic=True` Dynamo does not bake a module's Python float attributes (`self.variance_epsilon`,
`self.scaling`) into the graph: each becomes a 0-d float64 graph input read with `.item()`, and Dynamo
puts no guard on its value. Every rule that needs a constant (the eps of a norm, the scale of attention,
GELU's coefficients) then sees an unknown tensor instead and nothing fuses. The value is known when the
graph is compiled (it is in the example inputs), and in practice it never changes, so:

- each such input whose every use is `.item()` is replaced by its value in the graph that is compiled;
- the compiled program checks the values on every call (one `.item()` each) and, where one differs,
  runs the graph as Dynamo traced it, eagerly (correct for any value, just not fused), warning once.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from fusion.errors import warn_fallback


def _is_item(n: fx.Node) -> bool:
    return n.op == "call_method" and n.target == "item" and len(n.args) == 1


def specialize_floats(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[tuple[int, float]]:
    """Replace the `.item()` reads of Dynamo's float inputs by their example values, in place; return
    (input index, value) for each input specialised."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return []
    fixed = []
    for i, (ph, ex) in enumerate(zip(placeholders, example_inputs)):
        if not (type(ex) is torch.Tensor and ex.dim() == 0 and ex.dtype == torch.float64 and ex.device.type == "cpu"
                and not ex.requires_grad and ph.users and all(_is_item(u) for u in ph.users)):
            continue
        value = float(ex.item())
        for item in list(ph.users):
            for user in list(item.users):
                user.args = fx.node.map_arg(user.args, lambda a, item=item: value if a is item else a)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda a, item=item: value if a is item else a)
            gm.graph.erase_node(item)
        fixed.append((i, value))
    if fixed:
        gm.graph.lint()
        gm.recompile()
    return fixed


def guarded(compiled: Callable[..., Any], traced: fx.GraphModule, fixed: list[tuple[int, float]]) -> Callable[..., Any]:
    """`compiled` while the specialised inputs hold their values; `traced` (the graph before specialising,
    run eagerly) for a call where one does not."""
    warned = []

    def run(*args: Any) -> Any:
        for i, value in fixed:
            if args[i].item() != value:
                if not warned:
                    warned.append(True)
                    warn_fallback("guard", f"a float the graph was specialised on changed ({value!r} -> "
                                  f"{args[i].item()!r})", what_runs="the graph runs unfused for such calls")
                return traced(*args)
        return compiled(*args)

    run.__wrapped__ = compiled   # type: ignore[attr-defined]
    return run
