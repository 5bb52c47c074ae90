"""One walk over an FX value's users, for the questions several passes ask of a value: does it reach the
graph output through views, is it used outside a kernel, does it feed a matrix product; and one answer to
"does this graph run on the GPU" (`on_cuda`), for the backend choice and extraction's dtype table."""
from __future__ import annotations

from collections.abc import Callable

import operator

import torch
from torch import fx

import fusion.dialect.ops  # noqa: F401  (registers torch.ops.fusion.attention)

aten = torch.ops.aten


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


#: ops whose output strides depend on their inputs' (SDPA's output follows q's memory order, and the
#: program's kernels may write q in another order than the traced model did): the fake value's strides are one
#: of them, so a clone of a view of their output is a real copy at run time
LAYOUT_VARIES = frozenset({aten.scaled_dot_product_attention.default,
                           aten._scaled_dot_product_flash_attention_for_cpu.default, torch.ops.fusion.attention.default})
STRIDE_VIEWS = frozenset({aten.permute.default, aten.transpose.int, aten.view.default, aten._unsafe_view.default,
                          aten.reshape.default, aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default,
                          aten.slice.Tensor, aten.select.int, aten.alias.default, aten.t.default})


def layout_may_differ(src: fx.Node) -> bool:
    """Whether `src` is (a view of) an output whose strides at run time may differ from its fake value's."""
    while src.op == "call_function" and src.target in STRIDE_VIEWS and isinstance(src.args[0], fx.Node):
        src = src.args[0]
    if src.op == "call_function" and src.target is operator.getitem and isinstance(src.args[0], fx.Node):
        src = src.args[0]
    return src.op == "call_function" and src.target in LAYOUT_VARIES
