"""Shared-input matmul merging (rule `shared_matmul`): linears that read the same input become ONE GEMM + a split.

    addmm(bq, x, permute(Wq, [1, 0]))                 y = fusion.stacked_linear(x, [Wq, Wk, Wv], [bq, bk, bv])
    addmm(bk, x, permute(Wk, [1, 0]))        ->       q = slice(y, 1, 0, Nq);  k = slice(y, 1, Nq, Nq + Nk)
    addmm(bv, x, permute(Wv, [1, 0]))                 v = slice(y, 1, Nq + Nk, Nq + Nk + Nv)

(Q/K/V projections, LLaMA's gate/up; `mm` without biases likewise). Identity: the columns of x @ [Wq; Wk; Wv]^T
are x @ Wq^T, x @ Wk^T, x @ Wv^T, and a bias row adds column-wise, so each slice is exactly its product (same
summation over K; a GEMM may block it differently: fp32 rounding differences only).

Why an FX pass and not an e-graph rule: the merge is n-ary over the consumers of x (pairwise merges of n
products make 2^n - n - 1 variants in the e-graph, /work/shared/EGGLOG_NOTES.md), and whether it pays depends
on where the weights live at run time, which the e-graph does not model. It runs after the e-graph stage
(so `b + x @ W^T` is already `addmm`) and after the approximate stage (int8/bf16 sites are other ops by then).

When a group merges (side conditions, each a reason to leave a product out of its group):
- the product is fp32 on the CPU, `mm(x, permute(W, [1, 0]))` or `addmm(b, x, permute(W, [1, 0]))` with
  alpha = beta = 1, x 2-D; W [N, K] and b [N] are placeholders the caller will make adjacent in place
  (`stackable`: parameters under `fusion.optimize`; none under torch.compile, whose parameters are guarded
  graph inputs), used by this product only (a weight also used elsewhere — tied, transposed, in another
  group — is never moved);
- its value does not reach the graph output (through views): the outputs of a group are views of one buffer;
- the products share x: the same node, or views of one value with the same shape; the same K, dtype and
  bias kind (all with, all without);
- the cost model says so: one GEMM of [M, K] x [K, sum N] (on the library the gemm pass will pick for it,
  `fusion.passes.gemm.product_seconds`: oneDNN's rate and its fixed cost per call, or ATen's MKL) + the call of
  the merged op (`STACKED_CALL_S`) + one slice view per output, against the separate GEMMs (each with its
  call and, on ATen, its weight-transpose view). Merged only when strictly cheaper; every group's
  prediction is reported (`Merged.decisions`, shown by `explain()`).

The rewrite: `fusion.stacked_linear` before the first product of the group, one `aten.slice` per product in
its place; the weights stay placeholders (never data). `meta["val"]` is recomputed for every node that reads
the slices (their strides change: a slice is a non-contiguous [M, N] view with row stride sum N). If a
consumer cannot take the strided value (a `view` that would need a copy), its group is dropped and the
others are kept.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import fx

from fusion.dialect.graph_walk import reaches
from fusion.dialect.values import hint, same_dim, shape_key

aten = torch.ops.aten
RULE = "shared_matmul"
#: Python cost of one call of the merged op on the lowered program (fusion.dialect.stacked.stacked_linear_impl: the
#: adjacency checks of 3 weights and 3 biases + two as_strided views: measured 5 us here, 1 thread)
STACKED_CALL_S = 5e-6
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


@dataclass
class Merged:
    gm: fx.GraphModule
    fired: dict[str, list[str]] = field(default_factory=dict)   # {"shared_matmul": [product nodes replaced]}
    decisions: list[dict] = field(default_factory=list)          # one per candidate group, merged or not


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _fp32_cpu(v: Any, dim: int) -> bool:
    return (isinstance(v, torch.Tensor) and v.dim() == dim and v.dtype == torch.float32
            and v.device.type == "cpu")


def _reaches_output(n: fx.Node) -> bool:
    return reaches(n, lambda w: w.op == "output",
                   lambda w: w.op == "call_function" and (w.target is operator.getitem or _is_view(w.target)))


def _is_view(target: Any) -> bool:
    from fusion.costmodel.ops_table import is_view_target

    return is_view_target(target)


def _input_key(x: fx.Node) -> tuple:
    """Products read the same x when their x is one node, or views (view/reshape chains) of one value with the
    same shape."""
    base = x
    while base.op == "call_function" and base.target in _VIEWS and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    if base is x:
        return (x,)
    return (base, shape_key(_val(x).shape))


@dataclass
class _Product:
    node: fx.Node
    x: fx.Node
    weight: fx.Node          # placeholder [N, K]
    transpose: fx.Node       # permute(weight, [1, 0])
    bias: fx.Node | None     # placeholder [N]
    n: int


def _product(node: fx.Node, stackable: frozenset[str]) -> _Product | None:
    """The node as a stackable linear, or None (the side conditions of the module docstring)."""
    if node.op != "call_function":
        return None
    if node.target is aten.mm.default and len(node.args) == 2 and not node.kwargs:
        bias, (x, wt) = None, node.args
    elif (node.target is aten.addmm.default and len(node.args) == 3
          and node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1
          and not set(node.kwargs) - {"beta", "alpha"}):
        bias, x, wt = node.args
    else:
        return None
    if not (isinstance(x, fx.Node) and isinstance(wt, fx.Node) and _fp32_cpu(_val(x), 2) and _fp32_cpu(_val(node), 2)):
        return None
    if not (wt.op == "call_function" and wt.target is aten.permute.default and list(wt.args[1]) == [1, 0]
            and len(wt.users) == 1):
        return None
    w = wt.args[0]
    if not (isinstance(w, fx.Node) and w.op == "placeholder" and w.name in stackable and len(w.users) == 1
            and _fp32_cpu(_val(w), 2)):
        return None
    n, k = _val(w).shape
    if not (isinstance(n, int) and isinstance(k, int) and k > 0 and n > 0) or not same_dim(_val(x).shape[1], k):
        return None
    if bias is not None:
        bv = _val(bias)
        if not (isinstance(bias, fx.Node) and bias.op == "placeholder" and bias.name in stackable
                and len(bias.users) == 1 and _fp32_cpu(bv, 1) and bv.shape[0] == n):
            return None
    if _reaches_output(node):
        return None
    return _Product(node, x, w, wt, bias, n)


def candidate_groups(gm: fx.GraphModule, stackable: Iterable[str]) -> list[list[_Product]]:
    """Products that share their input, in groups of two or more, in graph order; members in placeholder
    order (the order of the weights in the block: for HF attention q, k, v)."""
    stackable = frozenset(stackable)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups: dict[tuple, list[_Product]] = {}
    for node in gm.graph.nodes:
        p = _product(node, stackable)
        if p is not None:
            groups.setdefault((_input_key(p.x), p.bias is None), []).append(p)
    out = [sorted(g, key=lambda p: order[p.weight]) for g in groups.values() if len(g) >= 2]
    return sorted(out, key=lambda g: min(order[p.node] for p in g))


def predict(group: list[_Product], hw: Any, tuner: Any = None) -> dict:
    """Seconds of the group as separate GEMMs and as one merged GEMM (see the module docstring): each product
    measured at its shape where `tuner` (fusion.passes.gemm.GemmTuner) has a measurement, else predicted."""
    from fusion.passes.gemm import product_seconds

    m, k = (hint(s) for s in _val(group[0].x).shape)
    bias = group[0].bias is not None
    view = getattr(hw, "view_overhead", 0.0)
    separate = 0.0
    for p in group:
        t, lib = product_seconds(m, k, p.n, bias, hw, tuner)
        separate += t + (view if lib == "aten" else 0.0)     # the gemm pass drops the transpose for oneDNN
    t, lib = product_seconds(m, k, sum(p.n for p in group), bias, hw, tuner)
    merged = t + STACKED_CALL_S + len(group) * view
    return {"products": [p.node.name for p in group], "weights": [p.weight.name for p in group],
            "m": m, "k": k, "n": [p.n for p in group], "library": lib,
            "separate_s": separate, "merged_s": merged, "merged": merged < separate}


def merge_shared_matmuls(gm: fx.GraphModule, hw: Any, stackable: Iterable[str], tuner: Any = None) -> Merged:
    """The pass: group, price, rewrite the groups predicted faster merged (on a copy; gm is not changed)."""
    groups = candidate_groups(gm, stackable)
    decisions = [predict(g, hw, tuner) for g in groups]
    chosen = [i for i, d in enumerate(decisions) if d["merged"]]
    while chosen:
        new, bad = _rewrite(gm, [groups[i] for i in chosen])
        if new is not None:
            fired = [p.node.name for i in chosen for p in groups[i]]
            return Merged(new, {RULE: fired} if fired else {}, decisions)
        i = chosen[bad]                   # a consumer cannot take this group's strided slices
        decisions[i].update(merged=False, note="a consumer of the split cannot read a strided slice")
        chosen = [j for j in chosen if j != i]
    return Merged(gm, {}, decisions)


def _rewrite(gm: fx.GraphModule, groups: list[list[_Product]]) -> tuple[fx.GraphModule | None, int]:
    """(new module, -1), or (None, index of the group a consumer of which failed under the new strides)."""
    import copy

    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    old_out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    graph.output(out).meta = dict(old_out.meta)
    origin: dict[fx.Node, set[int]] = {}      # new node -> groups whose slices it depends on
    for gi, group in enumerate(groups):
        nodes = [env[p.node] for p in group]
        first = min(nodes, key=lambda n: list(graph.nodes).index(n))
        x = env[next(p for p in group if env[p.node] is first).x]
        ws = [env[p.weight] for p in group]
        bs = [env[p.bias] if p.bias is not None else None for p in group]
        with graph.inserting_before(first):
            y = graph.call_function(torch.ops.fusion.stacked_linear.default, (x, ws, bs))
            y.meta["val"] = _val(x).new_empty((_val(x).shape[0], sum(p.n for p in group)))
            origin[y] = {gi}
        off = 0
        for p, node in zip(group, nodes):
            with graph.inserting_before(node):
                s = graph.call_function(aten.slice.Tensor, (y, 1, off, off + p.n))
            s.meta.update(node.meta)
            s.meta["val"] = y.meta["val"][:, off:off + p.n]
            origin[s] = {gi}
            off += p.n
            node.replace_all_uses_with(s)
            graph.erase_node(node)
            t = env[p.transpose]
            if not t.users:
                graph.erase_node(t)
    graph.eliminate_dead_code()
    # every node reading a slice gets its meta["val"] again: the slices' strides are not the products'
    fake = _fake_mode(gm)
    for n in graph.nodes:
        if n.op != "call_function" or n in origin:
            continue
        src = set().union(*(origin.get(a, set()) for a in n.all_input_nodes))
        if not src:
            continue
        origin[n] = src
        try:
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: a.meta["val"])
            with fake:
                n.meta["val"] = n.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - e.g. a view that needs a contiguous input
            return None, min(src)
    graph.lint()
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta.update(getattr(gm, "meta", {}))
    return new, -1


def _fake_mode(gm: fx.GraphModule) -> Any:
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"])
    return mode if mode is not None else FakeTensorMode(allow_non_fake_inputs=True)
