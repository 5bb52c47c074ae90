"""normalize, part 3: spellings of one value that the e-graph should see as one form, rewritten at FX level.

Real model code writes the same computation many ways; the ones below differ in ops the e-graph does not
model (multi-output reductions, fused multiply-adds, constants held as tensors), so they are brought to
the modelled form before insertion, where each is one exact identity:

    max.dim(x, d, keepdim)[0], indices unused  -> amax(x, [d], keepdim)   (`x.max(-1, keepdim=True).values`)
    min.dim(x, d, keepdim)[0], indices unused  -> amin(x, [d], keepdim)
    baddbmm(m, a, b, beta, alpha)              -> m * beta + bmm(a, b) * alpha   (Bloom's alibi scores;
                                                  beta == 1 / alpha == 1 drop the product)
    cat([empty, x], d)                          -> clone(x)  (a KV cache that starts empty: HF's DynamicCache;
                                                  normalize drops the clone where x is contiguous)
    lift_fresh_copy(0-d constant c)             -> scalar_tensor(c)   (`torch.tensor(finfo.min)` mask fills)
    masked_fill(x, m, v)                        -> where(m, scalar_tensor(v), x)   (AOTAutograd keeps masked_fill;
                                                  export's core ATen already writes it so)
    _assert_tensor_metadata(x, ...)             -> removed (export's check of a `.to()` input's dtype: the
                                                  program's own inputs are checked where it is called)

Each rewrite keeps values bit for bit: max/amax and min/amin return the same values, `cat` with an empty
operand copies the other, baddbmm is defined as `beta * m + alpha * (a @ b)`; the fused form is
`alpha * (a @ b) + beta * m` only up to the order of one add, which is exact (one rounding either way).
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from fusion.capture.trailing import Builder

aten = torch.ops.aten


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _max_values_only(g: fx.Graph, n: fx.Node) -> bool:
    """max.dim / min.dim whose indices nobody reads -> amax / amin (one output, a modelled reduction)."""
    if not n.users or not all(u.target is operator.getitem and u.args[1] == 0 for u in n.users):
        return False
    x, d = n.args[0], n.args[1]
    keepdim = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    target = aten.amax.default if n.target is aten.max.dim else aten.amin.default
    with g.inserting_before(n):
        r = Builder(g, _val(x)).op(target, x, [d], bool(keepdim))
    for u in list(n.users):
        u.replace_all_uses_with(r)
        g.erase_node(u)
    g.erase_node(n)
    return True


def _baddbmm(g: fx.Graph, n: fx.Node) -> bool:
    """baddbmm(m, a, b, beta=, alpha=) -> m*beta + bmm(a, b)*alpha, so the attention rules see the product."""
    m, a, b = n.args[:3]
    beta = n.kwargs.get("beta", n.args[3] if len(n.args) > 3 else 1)
    alpha = n.kwargs.get("alpha", n.args[4] if len(n.args) > 4 else 1)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (beta, alpha)) or beta == 0:
        return False   # beta == 0 ignores m even where it holds nan: not m*0
    with g.inserting_before(n):
        bld = Builder(g, _val(a))
        prod = bld.op(aten.bmm.default, a, b)
        if alpha != 1:
            prod = bld.op(aten.mul.Tensor, prod, alpha)
        bias = m if beta == 1 else bld.op(aten.mul.Tensor, m, beta)
        out = bld.op(aten.add.Tensor, prod, bias)
    out.meta = {**n.meta, "val": out.meta["val"]}
    n.replace_all_uses_with(out)
    g.erase_node(n)
    return True


def _cat_of_empty(g: fx.Graph, n: fx.Node) -> bool:
    """cat([empty, x], d) -> x, where every other operand has size 0 along d (an empty cache concatenated
    with the new keys). Not for a graph output (the result would alias x) and only for the same dtype."""
    parts = n.args[0]
    if not isinstance(parts, (list, tuple)) or any(not isinstance(p, fx.Node) for p in parts):
        return False
    out = _val(n)
    d = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    if not isinstance(out, torch.Tensor) or not isinstance(d, int):
        return False
    full = [p for p in parts if not _empty_part(_val(p), out, d)]
    if len(full) != 1 or _val(full[0]).dtype != out.dtype or _val(full[0]).dim() != out.dim():
        return False
    users = [u for u in n.users if u.op != "output"]
    if not users:
        return False
    with g.inserting_before(n):   # cat's result is contiguous; views of it need that (no-op clones go later)
        copy = Builder(g, out).op(aten.clone.default, full[0], memory_format=torch.contiguous_format)
    for u in users:
        u.replace_input_with(n, copy)
    return True


def _empty_part(v: Any, out: torch.Tensor, d: int) -> bool:
    """An operand cat adds nothing from: size 0 along d, or the 1-D `tensor([])` that cat skips."""
    if not isinstance(v, torch.Tensor):
        return False
    if v.dim() == 1 and out.dim() != 1:
        return isinstance(v.shape[0], int) and v.shape[0] == 0
    return v.dim() == out.dim() and isinstance(v.shape[d], int) and v.shape[d] == 0


def _fresh_scalar(gm: fx.GraphModule, g: fx.Graph, n: fx.Node) -> bool:
    """lift_fresh_copy of a 0-d float constant (a `torch.tensor(v)` in the model) -> scalar_tensor(v): the
    rules read mask fills (dtype min, -inf) from constants, never from tensor attributes."""
    src = n.args[0]
    if not isinstance(src, fx.Node) or src.op != "get_attr":
        return False
    try:
        c = getattr(gm, src.target)
    except AttributeError:
        return False
    if not isinstance(c, torch.Tensor) or c.dim() != 0 or not c.is_floating_point() or c.device.type != "cpu":
        return False
    from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

    if is_fake(c):
        return False
    with unset_fake_temporarily():   # AOTAutograd runs normalize under its fake mode; c is a real constant
        value = c.item()
    with g.inserting_before(n):
        s = g.call_function(aten.scalar_tensor.default, (value,), {"dtype": c.dtype, "device": c.device})
    s.meta = dict(n.meta)
    n.replace_all_uses_with(s)
    g.erase_node(n)
    return True


def _masked_fill(g: fx.Graph, n: fx.Node) -> bool:
    """masked_fill(x, m, v) -> where(m, v, x), v a scalar (or a 0-d tensor) of x's dtype: the mask form the
    attention and softmax rules read. The result keeps x's shape (m broadcasts to x, never beyond)."""
    x, m, v = n.args[:3]
    xv, mv, out = _val(x), _val(m), _val(n)
    if not all(isinstance(t, torch.Tensor) for t in (xv, mv, out)) or tuple(out.shape) != tuple(xv.shape):
        return False
    if not xv.is_floating_point() or mv.dtype != torch.bool:
        return False
    with g.inserting_before(n):
        if isinstance(v, fx.Node):
            vv = _val(v)
            if not (isinstance(vv, torch.Tensor) and vv.dim() == 0 and vv.dtype == xv.dtype):
                return False
            fill = v
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            fill = g.call_function(aten.scalar_tensor.default, (float(v),), {"dtype": xv.dtype, "device": xv.device})
            fill.meta = {"val": torch.empty((), dtype=xv.dtype, device=xv.device) if not _is_fake(xv)
                         else xv.new_empty(())}
        else:
            return False
        w = g.call_function(aten.where.self, (m, fill, x))
    w.meta = dict(n.meta)
    n.replace_all_uses_with(w)
    g.erase_node(n)
    return True


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


_MAX_MIN = (aten.max.dim, aten.min.dim)


def normalize_spellings(gm: fx.GraphModule) -> None:
    """The rewrites above, in place (normalize lints and recompiles afterwards)."""
    g = gm.graph
    for n in list(g.nodes):
        if n.op != "call_function":
            continue
        if n.target in _MAX_MIN:
            _max_values_only(g, n)
        elif n.target is aten.baddbmm.default:
            _baddbmm(g, n)
        elif n.target is aten.cat.default:
            _cat_of_empty(g, n)
        elif n.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            _masked_fill(g, n)
        elif n.target is aten.lift_fresh_copy.default:
            _fresh_scalar(gm, g, n)
        elif n.target is aten._assert_tensor_metadata.default:
            g.erase_node(n)
