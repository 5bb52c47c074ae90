"""prepare: graph clean-ups that only pay off when generated kernels follow (a named pass of the driver).

    gm = prepare(gm)        # a new GraphModule, or gm itself when nothing applies

The driver keeps its result only when lowering makes kernels: on an all-ATen program the clean-ups
(an addmm split into mm + add) would only cost time. The four clean-ups are listed on `prepare`.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from fusion.dialect.graph_walk import layout_may_differ, reaches
from fusion.dialect.values import tval
from fusion.lower import schedule as S

aten = torch.ops.aten


#: ATen ops whose result may share storage with their first argument
_ALIASING = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.alias.default, aten.t.default,
    aten.transpose.int, aten.permute.default, aten.expand.default, aten.slice.Tensor, aten.select.int,
    aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.as_strided.default,
    aten.diagonal.default, aten.unfold.default, aten.chunk.default, aten.narrow.default,
    aten.view_as_real.default, aten.view_as_complex.default, aten.detach.default, operator.getitem,
}


def _aliases_output_or_input(n: fx.Node) -> bool:
    """True if n (through view-like users) is a graph output, or n is (through views) a graph input."""
    return reaches(n, lambda w: w.op == "output", lambda w: w.op != "call_function" or w.target in _ALIASING)


def _from_input(n: Any) -> bool:
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in _ALIASING and n.args:
        n = n.args[0]
    return not isinstance(n, fx.Node) or n.op != "call_function"


def prepare(gm: fx.GraphModule) -> fx.GraphModule:
    """Graph clean-ups that only pay off with kernels (on a copy; gm itself stays as it was):

    - a `clone` of a value that is already contiguous (dropout in eval, `.contiguous()` no-ops) is
      dropped, unless the clone is (through views) a graph output or its input comes from a graph input
      (aliasing would then be observable);
    - `addmm(b, x, w)` whose result feeds (through one view) only fusable ops becomes
      `mm(x, w)` + `b` after the view, so the bias add joins the consumer's kernel instead of ATen
      copying the bias into the output before the GEMM;
    - `view(clone(x), shape)` read only by bmm/mm becomes `reshape(x, shape)` (no copy when the strides
      allow a view: BLAS reads K^T transposed);
    - `cat([-x[..., h:], x[..., :h]], -1)` (RoPE) becomes `rotate_half(x)`, which kernels read as an
      index-shifted load."""
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    changed = False
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        if n.target is aten.clone.default and len(n.args) == 1 and isinstance(n.args[0], fx.Node):
            x, v = n.args[0], tval(n)
            xv = tval(n.args[0])
            mf = n.kwargs.get("memory_format")
            if (xv is None or v is None or set(n.kwargs) - {"memory_format"}
                    or mf not in (None, torch.contiguous_format, torch.preserve_format)
                    or not xv.is_contiguous() or layout_may_differ(x) or xv.dtype != v.dtype or _from_input(x)
                    or _aliases_output_or_input(n)):
                continue
            n.replace_all_uses_with(x)
            graph.erase_node(n)
            changed = True
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target in (aten._unsafe_view.default, aten.view.default):
            changed |= _reshape_for_matmul(graph, n)
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target is aten.addmm.default:
            changed |= _split_addmm(graph, n)
        elif n.op == "call_function" and n.target is aten.cat.default:
            changed |= _rotate_half(graph, n)
    if not changed:
        return gm
    graph.eliminate_dead_code()
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta.update(getattr(gm, "meta", {}))
    return new


def _reshape_for_matmul(graph: fx.Graph, n: fx.Node) -> bool:
    """view(clone(x, contiguous), shape) read only by bmm/mm -> reshape(x, shape): no copy when the
    strides allow a view (K^T of a contiguous K: BLAS reads it transposed), a copy otherwise."""
    c = n.args[0]
    if not (isinstance(c, fx.Node) and c.op == "call_function" and c.target is aten.clone.default
            and len(c.users) == 1 and len(c.args) == 1
            and c.kwargs.get("memory_format") in (None, torch.contiguous_format)):
        return False
    if not n.users or any(u.op != "call_function" or u.target not in (aten.bmm.default, aten.mm.default)
                          for u in n.users):
        return False
    with graph.inserting_before(n):
        r = graph.create_node("call_function", aten.reshape.default, (c.args[0], n.args[1]), name=f"{n.name}_r")
        r.meta = dict(n.meta)
    n.replace_all_uses_with(r)
    graph.erase_node(n)
    graph.erase_node(c)
    return True


def _slice_of(n: Any, rank: int) -> tuple | None:
    """(x, start, end) of a step-1 slice over the last dim, else None."""
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target is aten.slice.Tensor):
        return None
    a = list(n.args) + [None] * (5 - len(n.args))
    x, dim, start, end, step = a[:5]
    dim = 0 if dim is None else dim
    if dim not in (-1, rank - 1) or step not in (None, 1) or n.kwargs:
        return None
    return x, start or 0, end


def _rotate_half(graph: fx.Graph, n: fx.Node) -> bool:
    """cat([-x[..., h:], x[..., :h]], -1) with N = 2h static -> S.rotate_half(x) (RoPE)."""
    v = tval(n)
    if v is None or len(n.args) < 2 or not isinstance(n.args[0], (list, tuple)) or len(n.args[0]) != 2:
        return False
    r = v.dim()
    if n.args[1] not in (-1, r - 1) or n.kwargs:
        return False
    a, b = n.args[0]
    if not (isinstance(a, fx.Node) and a.target is aten.neg.default):
        return False
    sa, sb = _slice_of(a.args[0], r), _slice_of(b, r)
    if sa is None or sb is None or sa[0] is not sb[0]:
        return False
    x = sa[0]
    xv = tval(x)
    if xv is None or xv.dim() != r or xv.dtype != v.dtype or list(xv.shape) != list(v.shape):
        return False
    N = xv.shape[-1]
    if isinstance(N, torch.SymInt) or N % 2 or N < 2:
        return False
    h = N // 2
    if sa[1] != h or sa[2] is None or sa[2] < N or sb[1] != 0 or sb[2] != h:
        return False
    with graph.inserting_before(n):
        rot = graph.create_node("call_function", S.rotate_half, (x,), name=f"{n.name}_rotate_half")
        rot.meta = dict(n.meta)
    n.replace_all_uses_with(rot)
    graph.erase_node(n)
    return True


def _split_addmm(graph: fx.Graph, n: fx.Node) -> bool:
    b, x, w = n.args[:3]
    if n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1 or len(n.args) > 3:
        return False
    bv, v = tval(b), tval(n)
    if bv is None or v is None or bv.dim() != 1 or v.dtype not in S.FLOAT_IN or bv.dtype != v.dtype:
        return False
    if len(n.users) != 1:
        return False
    (view,) = n.users
    if view.op != "call_function" or view.target not in (aten.view.default, aten._unsafe_view.default,
                                                          aten.reshape.default):
        return False
    vv = tval(view)
    if vv is None or not view.users or list(vv.shape[-1:]) != list(v.shape[-1:]):
        return False
    if any(S.classify(u) not in ("pw", "red", "fused") for u in view.users):
        return False
    with graph.inserting_before(n):
        mm = graph.create_node("call_function", aten.mm.default, (x, w), name=f"{n.name}_mm")
        mm.meta = dict(n.meta)
    with graph.inserting_after(view):
        add = graph.create_node("call_function", aten.add.Tensor, (view, b), name=f"{n.name}_bias")
        add.meta = dict(view.meta)
    view.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
    view.args = (mm,) + tuple(view.args[1:])
    graph.erase_node(n)
    return True
