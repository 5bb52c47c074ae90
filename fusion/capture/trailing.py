"""normalize, part 2: reductions over several trailing dims become last-dim reductions of a flattening view.

The e-graph rules and the row kernels model reductions over ONE dim, the last. A reduction over the last
k >= 2 dims Q of a contiguous x of shape s = P + Q (`x.mean((-2, -1))`, `F.layer_norm(x, (H, W))`,
`F.group_norm`) is the same reduction over the last dim of `xf = view(x, P + [prod Q])` (a contiguous x
lays each Q block out as one row), so it is rewritten here, at FX level, into that form:

    r(x, Q, keepdim=True)   -> view(r(xf, -1, keepdim=True), P + [1]*k)
    r(x, Q, keepdim=False)  -> r(xf, -1, keepdim=False)                    (already of shape P)

for sum, mean, amax, amin, var and var_mean. For the norms built from such reductions to be recognised, the
pointwise ops around them must be in the flattened domain too: every float pointwise op (add, sub, mul,
div, pow, the e-graph's unary ops) whose output has shape s or P + [1]*k of such a split, and whose tensor
operands flatten the same way (0-d; trailing k dims all equal to the output's, or all 1), is rewritten to
the op on flattened views of its operands and a view back:

    op(a, b) -> view(op(view(a, ·), view(b, ·)), shape)

Adjacent views then cancel in the e-graph (`view(view(x, s), t) = view(x, t)`, `view(x, shape x) = x`,
layout family), so `x - mean(x, Q)` meets the layer-norm rules as `xf - mean(xf, -1)`. Views of a graph
input or weight are created before views of computed values, so a weight keeps the first-operand place
that the e-graph's canonical order gives leaves (`w * norm(x)`).

Directly, without rules:
    native_layer_norm(x, Q, w, b, eps)[0]  -> view(fusion.layer_norm(xf, view(w, [prod Q]), view(b, ·), eps), s)
    native_group_norm(x, w, b, N, C, HxW, G, eps)[0]
        -> view(fusion.layer_norm(view(x, [N, G, C/G*HxW]), None, None, eps), s) * view(w, [C, 1, ..]) + view(b, ·)

Only static shapes and operands whose `meta["val"]` is contiguous (a view must not need a copy); anything
else (a reduction over non-trailing dims like `x.mean((0, 2))`, a strided x, symbolic sizes) stays as it was.
Graphs without such a reduction are not changed.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx

aten = torch.ops.aten

_REDUCE = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default, aten.var.correction,
           aten.var_mean.correction}
_POINTWISE = {
    *(getattr(aten, o).Tensor for o in ("add", "sub", "mul", "div")),
    *(getattr(aten, o).Scalar for o in ("add", "sub", "mul", "div")),
    *(getattr(aten, o).default for o in ("exp", "log", "erf", "tanh", "sigmoid", "sqrt", "rsqrt", "reciprocal",
                                         "neg", "relu", "abs")),
    aten.pow.Tensor_Scalar,
}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _static(v: Any) -> tuple[int, ...] | None:
    if not isinstance(v, torch.Tensor) or not all(isinstance(d, int) for d in v.shape):
        return None
    return tuple(v.shape)


def _contig(v: Any) -> bool:
    return (_static(v) is not None and all(isinstance(d, int) for d in v.stride()) and v.is_contiguous()
            and v.layout == torch.strided)


class Builder:
    """Creates call_function nodes in `g` with meta["val"] computed under the graph's fake mode."""

    def __init__(self, g: fx.Graph, like: torch.Tensor):
        from torch._guards import detect_fake_mode

        self.g = g
        self.fake_mode = detect_fake_mode([like])

    def op(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        n = self.g.create_node("call_function", target, args, kwargs)
        vals = [_val(a) if isinstance(a, fx.Node) else a for a in args]
        kw = {k: _val(a) if isinstance(a, fx.Node) else a for k, a in kwargs.items()}
        if self.fake_mode is not None:
            with self.fake_mode:
                n.meta["val"] = target(*vals, **kw)
        else:
            n.meta["val"] = target(*vals, **kw)
        return n

    def view(self, x: fx.Node, shape: Any) -> fx.Node:
        if _static(_val(x)) == tuple(shape):
            return x
        return self.op(aten.view.default, x, list(shape))


def _trailing_dims(dims: Any, rank: int) -> int | None:
    """k when `dims` are exactly the last k >= 2 dims (any order), else None."""
    if not isinstance(dims, (list, tuple)) or len(dims) < 2:
        return None
    if not all(isinstance(d, int) and not isinstance(d, bool) and -rank <= d < rank for d in dims):
        return None
    norm = sorted(d % rank for d in dims)
    k = len(norm)
    return k if norm == list(range(rank - k, rank)) else None


def _reduce_args(n: fx.Node) -> tuple[Any, bool] | None:
    """(dims, keepdim) of a reduction node in its ATen signature."""
    names = {aten.sum.dim_IntList: ("self", "dim", "keepdim", "dtype"), aten.mean.dim: ("self", "dim", "keepdim", "dtype"),
             aten.amax.default: ("self", "dim", "keepdim"), aten.amin.default: ("self", "dim", "keepdim"),
             aten.var.correction: ("self", "dim", "correction", "keepdim"),
             aten.var_mean.correction: ("self", "dim", "correction", "keepdim")}[n.target]
    a = dict(zip(names, n.args), **n.kwargs)
    if a.get("dtype") is not None:
        return None
    return a.get("dim"), bool(a.get("keepdim", False))


def _flat_shape(u: tuple[int, ...], out: tuple[int, ...], k: int) -> tuple[int, ...] | None:
    """The flattened shape of an operand of shape u broadcast to `out` (whose last k dims are flattened)."""
    if len(u) == 0:
        return u
    tail = out[-k:]
    if len(u) >= k:
        if tuple(u[-k:]) == tail:
            return u[:-k] + (math.prod(tail),)
        if all(d == 1 for d in u[-k:]):
            return u[:-k] + (1,)
        return None
    return (1,) if all(d == 1 for d in u) else None


def _flatten_reductions(g: fx.Graph) -> set[tuple[tuple[int, ...], int]]:
    splits: set[tuple[tuple[int, ...], int]] = set()
    for n in list(g.nodes):
        if n.op != "call_function" or n.target not in _REDUCE:
            continue
        x = n.args[0]
        xv = _val(x)
        ra = _reduce_args(n)
        if ra is None or not _contig(xv) or xv.dtype not in _FLOATS:
            continue
        s = _static(xv)
        k = _trailing_dims(ra[0], len(s))
        if k is None:
            continue
        keep = ra[1]
        P, Q = s[:-k], s[-k:]
        b = Builder(g, xv)
        kwargs = {} if n.target not in (aten.var.correction, aten.var_mean.correction) else {
            "correction": dict(zip(("self", "dim", "correction", "keepdim"), n.args), **n.kwargs).get("correction", 1),
            "keepdim": keep}
        with g.inserting_before(n):
            xf = b.view(x, P + (math.prod(Q),))
            if kwargs:
                r = b.op(n.target, xf, [-1], **kwargs)
            else:
                r = b.op(n.target, xf, [-1], keep)
        splits.add((s, k))
        if n.target is aten.var_mean.correction:
            for u in list(n.users):
                if u.target is not operator.getitem:
                    continue
                with g.inserting_after(u):
                    gi = b.op(operator.getitem, r, u.args[1])
                with g.inserting_after(gi):
                    out = b.view(gi, P + (1,) * k) if keep else gi
                u.replace_all_uses_with(out)
                g.erase_node(u)
            if not n.users:
                g.erase_node(n)
            continue
        with g.inserting_before(n):
            out = b.view(r, P + (1,) * k) if keep else r
        n.replace_all_uses_with(out)
        g.erase_node(n)
    return splits


def _flatten_pointwise(g: fx.Graph, splits: set[tuple[tuple[int, ...], int]]) -> None:
    shapes: dict[tuple[int, ...], int] = {}
    for s, k in splits:
        shapes.setdefault(s, k)
        shapes.setdefault(s[:-k] + (1,) * k, k)
    order = {n: i for i, n in enumerate(g.nodes)}
    for n in list(g.nodes):
        if n.op != "call_function" or n.target not in _POINTWISE or set(n.kwargs) - {"alpha"}:
            continue
        if n.kwargs.get("alpha", 1) != 1:
            continue
        v = _val(n)
        out = _static(v)
        if out is None or v.dtype not in _FLOATS or out not in shapes:
            continue
        k = shapes[out]
        flat_out = out[:-k] + (math.prod(out[-k:]),)
        targets: dict[fx.Node, tuple[int, ...]] = {}
        ok = True
        for a in n.args:
            if isinstance(a, fx.Node):
                av = _val(a)
                u = _static(av)
                f = None if u is None or av.dtype != v.dtype else _flat_shape(u, out, k)
                if f is None or (f != u and not _contig(av)):
                    ok = False
                    break
                targets[a] = f
            elif not isinstance(a, (int, float)) or isinstance(a, bool):
                ok = False
                break
        if not ok or not targets:
            continue
        b = Builder(g, v)
        views: dict[fx.Node, fx.Node] = {}
        # graph inputs / weights first, then computed values in definition order (the e-graph's operand order)
        for a in sorted(targets, key=lambda a: (a.op == "call_function", order.get(a, len(order)))):
            with g.inserting_before(n):
                views[a] = b.view(a, targets[a])
        args = tuple(views[a] if isinstance(a, fx.Node) else a for a in n.args)
        with g.inserting_before(n):
            flat = b.op(n.target, *args, **n.kwargs)
            back = b.view(flat, out)
        assert _static(_val(flat)) == flat_out
        n.replace_all_uses_with(back)
        g.erase_node(n)


def _layer_norm_multi(g: fx.Graph, node: fx.Node) -> bool:
    """`native_layer_norm(x, Q, w, b, eps)[0]` with len(Q) >= 2 -> views around a last-dim `fusion.layer_norm`."""
    x, nshape, w, b, eps = node.args
    xv = _val(x)
    s = _static(xv)
    if s is None or not _contig(xv) or not isinstance(nshape, (list, tuple)) or not 2 <= len(nshape) <= len(s):
        return False
    k = len(nshape)
    if tuple(s[-k:]) != tuple(nshape) or not isinstance(eps, (int, float)):
        return False
    Q = math.prod(s[-k:])
    for t in (w, b):
        if t is not None and (not isinstance(t, fx.Node) or not _contig(_val(t)) or _static(_val(t)) != tuple(nshape)
                              or _val(t).dtype != xv.dtype):
            return False
    bld = Builder(g, xv)
    with g.inserting_before(node):
        xf = bld.view(x, s[:-k] + (Q,))
        wf = bld.view(w, (Q,)) if w is not None else None
        bf = bld.view(b, (Q,)) if b is not None else None
        ln = bld.op(torch.ops.fusion.layer_norm.default, xf, wf, bf, float(eps))
        out = bld.view(ln, s)
    replace_first_output(g, node, out)
    return True


def _group_norm(g: fx.Graph, node: fx.Node) -> bool:
    """Inference `native_group_norm(x, w, b, N, C, HxW, G, eps)[0]` -> a last-dim layer norm (no affine) of
    `view(x, [N, G, C/G * HxW])`, viewed back, then `* w[c] + b[c]` with w, b viewed as [C, 1, ...]."""
    x, w, b, N, C, HxW, G, eps = node.args
    xv = _val(x)
    s = _static(xv)
    if s is None or not _contig(xv) or len(s) < 2 or not all(isinstance(i, int) for i in (N, C, HxW, G)):
        return False
    if G <= 0 or C % G or s[0] != N or s[1] != C or math.prod(s[2:]) != HxW or not isinstance(eps, (int, float)):
        return False
    for t in (w, b):
        if t is not None and (not isinstance(t, fx.Node) or _static(_val(t)) != (C,) or _val(t).dtype != xv.dtype):
            return False
    bld = Builder(g, xv)
    chan = (C,) + (1,) * (len(s) - 2)
    with g.inserting_before(node):
        xg = bld.view(x, (N, G, C // G * HxW))
        ln = bld.op(torch.ops.fusion.layer_norm.default, xg, None, None, float(eps))
        y = bld.view(ln, s)
        if w is not None:
            y = bld.op(aten.mul.Tensor, y, bld.view(w, chan))
        if b is not None:
            y = bld.op(aten.add.Tensor, y, bld.view(b, chan))
    replace_first_output(g, node, y)
    return True


def replace_first_output(g: fx.Graph, node: fx.Node, out: fx.Node) -> None:
    """`out` stands for `node[0]` (every user of node is getitem 0); node and those users are erased."""
    for user in list(node.users):
        user.replace_all_uses_with(out)
        g.erase_node(user)
    g.erase_node(node)


def only_first_output_used(node: fx.Node) -> bool:
    return all(u.target is operator.getitem and u.args[1] == 0 for u in node.users)


def flatten_trailing(gm: fx.GraphModule) -> None:
    """The rewrites of this module, in place (normalize lints and recompiles afterwards)."""
    g = gm.graph
    for n in list(g.nodes):
        if n.op != "call_function" or not only_first_output_used(n) or not n.users:
            continue
        if n.target is aten.native_layer_norm.default:
            _layer_norm_multi(g, n)
        elif n.target is aten.native_group_norm.default:
            _group_norm(g, n)
    splits = _flatten_reductions(g)
    if splits:
        _flatten_pointwise(g, splits)
