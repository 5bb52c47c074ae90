"""Clean-ups of a committed approximate graph (after the accuracy guard; values change only by rounding):

1. one conversion per activation: the sites of linears that read the same tensor (q/k/v of attention read
   one layer-norm output, each through its own view) each quantize it (`fusion.quantize_rows`) or cast it
   to bf16 (`_to_copy`); identical views and conversions of the same rows are merged (common subexpressions);
2. the activation joins the GEMM's epilogue: ``int8_matmul(..., "none") [-> views] -> gelu`` becomes
   ``int8_matmul(..., "gelu")`` (the same for ``bf16_linear``) — one pass less over the (widest) MLP
   activation;
3. the next linear's conversion joins it too: when that result is read only by `quantize_rows` (the next
   linear is int8), ``quantize_rows(int8_matmul(...))`` becomes ``int8_matmul_quant(...)``, which writes the
   int8 rows and their scales and never the fp32 activation; when it is read only by a cast to bf16 (the
   next linear is bf16), ``bf16_linear`` stores bf16 directly;
4. a bf16 linear whose result only feeds generated-kernel ops (the residual add + layer norm) hands them the
   bf16 GEMM result, its bias add moving into their kernel (`raw_bf16_gemms`): one pass less, half the bytes.

    n = fuse(gm, fake_mode)   # number of changes; gm is edited in place and recompiled
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten
fusion_ops = torch.ops.fusion

_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _is_view(n: Any) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in _VIEWS


def _last_dim(n: Any) -> Any:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v.shape[-1] if isinstance(v, torch.Tensor) and v.dim() else None


def _rows_root(x: fx.Node) -> fx.Node:
    """The node whose rows `quantize_rows(x)` quantizes: back through reshapes that keep the last dim (a
    reshape keeps the row-major order of the elements, so the rows are the same)."""
    k = _last_dim(x)
    while _is_view(x) and k is not None and _last_dim(x.args[0]) == k:
        x = x.args[0]
    return x


def _cse_key(n: fx.Node) -> Any:
    if n.op != "call_function":
        return None
    if n.target is fusion_ops.quantize_rows.default:
        return (n.target, _rows_root(n.args[0]))
    if n.target is aten._to_copy.default and len(n.args) == 1 and set(n.kwargs) == {"dtype"}:
        return (n.target, n.args[0], n.kwargs["dtype"])
    if n.target is aten.sym_size.int:   # (dynamic shapes: the sizes views read, so that those views merge)
        return (n.target, n.args[0], n.args[1])
    if n.target in _VIEWS and len(n.args) == 2 and not n.kwargs:   # identical views (so their casts merge too)
        return (n.target, n.args[0], tuple(n.args[1]))
    return None


def merge_conversions(g: fx.Graph) -> int:
    seen: dict[Any, fx.Node] = {}
    changed = 0
    for n in list(g.nodes):
        key = _cse_key(n)
        if key is None:
            continue
        first = seen.setdefault(key, n)
        if first is not n:
            n.replace_all_uses_with(first)
            g.erase_node(n)
            changed += 1
    return changed


def _only_user(n: fx.Node) -> fx.Node | None:
    return next(iter(n.users)) if len(n.users) == 1 else None


def _past_views(n: fx.Node) -> fx.Node:
    """Follow `n` forward through views that are each the only reader of the one before."""
    u = _only_user(n)
    while u is not None and _is_view(u):
        n, u = u, _only_user(u)
    return n


def _gelu_after(m: fx.Node) -> tuple[fx.Node, str] | None:
    """The gelu that is the only consumer of int8_matmul `m` (through views), with its act name."""
    u = _only_user(_past_views(m))
    if u is None or u.op != "call_function" or u.target is not aten.gelu.default or len(u.args) != 1:
        return None
    approx = u.kwargs.get("approximate", "none")
    if set(u.kwargs) - {"approximate"} or approx not in ("none", "tanh"):
        return None
    return u, ("gelu" if approx == "none" else "gelu_tanh")


def _set_val(n: fx.Node, fake_mode: Any) -> None:
    if fake_mode is None:
        return
    fa, fk = fx.node.map_arg((n.args, n.kwargs), lambda a: a.meta.get("val"))
    try:
        with fake_mode:
            n.meta["val"] = n.target(*fa, **fk)
    except Exception:  # noqa: BLE001 - meta is best effort
        pass


#: GEMM ops with an epilogue: op -> index of its `act` argument
_EPILOGUE_ACT = {fusion_ops.int8_matmul.default: 6, fusion_ops.bf16_linear.default: 4}


def _is_bf16_cast(n: Any) -> bool:
    return (isinstance(n, fx.Node) and n.op == "call_function" and n.target is aten._to_copy.default
            and len(n.args) == 1 and set(n.kwargs) == {"dtype"} and n.kwargs["dtype"] is torch.bfloat16)


def fuse_epilogues(g: fx.Graph, fake_mode: Any) -> int:
    changed = 0
    for m in list(g.nodes):
        i = _EPILOGUE_ACT.get(m.target) if m.op == "call_function" else None
        if i is None or m.args[i] != "none":
            continue
        hit = _gelu_after(m)
        if hit is None:
            continue
        gelu, act = hit
        m.args = m.args[:i] + (act,) + m.args[i + 1:]
        gelu.replace_all_uses_with(gelu.args[0])
        g.erase_node(gelu)
        changed += 1
        # the activation's only reader (through views) converts it for the next int8 / bf16 linear
        end = _past_views(m)
        conv = _only_user(end)
        if conv is None or conv.op != "call_function":
            continue
        if m.target is fusion_ops.int8_matmul.default and conv.target is fusion_ops.quantize_rows.default:
            with g.inserting_before(conv):
                fused = g.call_function(fusion_ops.int8_matmul_quant.default, m.args)
            _set_val(fused, fake_mode)
            conv.replace_all_uses_with(fused)
            g.erase_node(conv)   # m and its views are dead now: eliminate_dead_code removes them
            changed += 1
        elif m.target is fusion_ops.bf16_linear.default and _is_bf16_cast(conv):
            m.args = m.args[:5] + (True,)            # the epilogue stores bf16
            conv.replace_all_uses_with(end)
            g.erase_node(conv)
            n = m
            while True:                              # the views now carry bf16
                _set_val(n, fake_mode)
                if n is end:
                    break
                n = _only_user(n)
            changed += 1
    return changed


def raw_bf16_gemms(g: fx.Graph, fake_mode: Any) -> int:
    """A bf16 linear read (through views) only by ops a generated CPU kernel takes in (the residual add before a
    layer norm, an activation) returns the bf16 GEMM result itself, and its bias add becomes a graph node
    (``add(y_bf16, bias)``, fp32 as before) that the lowering fuses into that kernel, which then reads bf16:
    the epilogue pass (read bf16, write fp32) and the fp32 tensor are gone. The values are the same bits
    (the fp32 sum of the bf16 GEMM result and the bias, in the consumer's kernel instead of the epilogue)."""
    from fusion.lower import schedule as S

    devices = ("cpu", S.CPU_BF16)
    changed = 0
    for m in list(g.nodes):
        if m.op != "call_function" or m.target is not fusion_ops.bf16_linear.default:
            continue
        x, w, bias, kn, act, out_bf16 = m.args
        v = m.meta.get("val")
        if act != "none" or out_bf16 or not isinstance(v, torch.Tensor) or v.device.type != "cpu":
            continue
        end = _past_views(m)
        if not end.users or not all(S.classify(u, devices) in ("pw", "fused") for u in end.users):
            continue
        m.args = (x, w, None, kn, "none", True)
        # fp32 again after the views that keep the rows (so the add joins the consumer's kernel domain),
        # else right after the GEMM; without a bias: an upcast, which the kernel does on load
        at = end if _last_dim(end) == _last_dim(m) else m
        n = m
        while True:
            _set_val(n, fake_mode)
            if n is at:
                break
            n = _only_user(n)
        with g.inserting_after(at):
            y = g.call_function(aten.add.Tensor, (at, bias)) if bias is not None else \
                g.call_function(aten._to_copy.default, (at,), {"dtype": torch.float32})
        at.replace_all_uses_with(y, delete_user_cb=lambda u: u is not y)
        _set_val(y, fake_mode)
        changed += 1
    return changed


def hoist_casts(g: fx.Graph, fake_mode: Any) -> int:
    """``_to_copy(view(x), bf16)`` -> ``view(_to_copy(x, bf16))`` for a contiguous fp32 x: the cast then has x's
    shape, so the kernel producing x (a layer norm) also writes its bf16 copy, instead of a separate pass."""
    changed = 0
    for n in list(g.nodes):
        if not _is_bf16_cast(n) or not _is_view(n.args[0]):
            continue
        chain = []
        r = n.args[0]
        while _is_view(r):
            chain.append(r)
            r = r.args[0]
        rv = r.meta.get("val") if isinstance(r, fx.Node) else None
        if not isinstance(rv, torch.Tensor) or rv.dtype != torch.float32 or not rv.is_contiguous():
            continue
        with g.inserting_before(n):
            cur = g.call_function(aten._to_copy.default, (r,), {"dtype": torch.bfloat16})
            _set_val(cur, fake_mode)
            for view in reversed(chain):
                cur = g.call_function(view.target, (cur, *view.args[1:]), dict(view.kwargs))
                _set_val(cur, fake_mode)
        n.replace_all_uses_with(cur)
        g.erase_node(n)
        changed += 1
    return changed


def fuse(gm: fx.GraphModule, fake_mode: Any = None) -> int:
    g = gm.graph
    changed = merge_conversions(g) + fuse_epilogues(g, fake_mode)
    if raw_bf16_gemms(g, fake_mode) + hoist_casts(g, fake_mode):
        changed += 1 + merge_conversions(g)
    if changed:
        g.eliminate_dead_code()
        g.lint()
        gm.recompile()
    return changed
