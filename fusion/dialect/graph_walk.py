"""One walk over an FX value's users, for the questions several passes ask of a value: does it reach the
graph output through views, is it used outside a kernel, does it feed a matrix product; and one answer to
"does this graph run on the GPU" (`on_cuda`), for the backend choice and extraction's dtype table."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx


def on_cuda(gm: fx.GraphModule) -> bool:
    """True if any placeholder's meta "val" is a CUDA tensor: the program runs on the GPU."""
    return any(isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].device.type == "cuda"
               for n in gm.graph.nodes if n.op == "placeholder")


def reaches(n: fx.Node, found: Callable[[fx.Node], bool], through: Callable[[fx.Node], bool]) -> bool:
    """True if some user of n, or of a user `through` accepts (transitively), satisfies `found`."""
    seen, stack = set(), [n]
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        for w in u.users:
            if found(w):
                return True
            if through(w):
                stack.append(w)
    return False
