"""Memory footprint: weights, peak activations and the KV cache of attention, as functions of batch and
sequence length (what `Analysis.kv_cache_bytes`, `Analysis.memory` and `Analysis.memory_plot` report).

KV cache. A decoder that generates token by token keeps, per attention site, the K and V it computed for
every past position. The sites are read off the captured graph:
    fused ops        fusion.attention / aten SDPA (q, k, v, ...)          K = args[1], V = args[2]
    matmul pairs     s = bmm(q, K); ... softmax/exp ...; o = bmm(p, V)      (what SDPA and `q @ k^T`
                     decompose to: K and V are the right operands; neither may be a weight)
What is stored is the smallest tensor K (or V) is a layout/scale copy of: walking back through views,
clones, `expand` and scalar multiplies undoes `repeat_kv`, so grouped-query attention counts its
num_key_value_heads, not its query heads. The bytes per (batch element, position) are the site's K and
V bytes over (batch x KV length) of the example; the KV length is the last dim of the scores. Without
any site in the graph (a Dynamo-captured model, a model that is not attention), a Hugging Face
`model.config` gives 2 x layers x key-value heads x head_dim x itemsize per position instead.

Peak activations: the largest sum of live intermediate values when the graph runs in order (a value
lives from the node that makes it to its last reader; views and getitem share their base's bytes and
keep it alive). For other shapes the model is captured again on inputs resized from the example:
inputs are batch-first, and every other dim equal to the example's sequence length is the sequence.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fusion.costmodel.ops_table import _SDPA, is_view_target, op_name

_MATMUL = {"bmm", "mm", "matmul"}
_SOFTMAX = {"_softmax", "softmax", "_safe_softmax", "exp", "exp2"}
# ops a stored K/V passes through on its way to the matmul: layout copies and scalar scales
_COPIES = {"clone", "contiguous", "_to_copy", "to", "alias", "mul", "div", "lift_fresh_copy"}


@dataclass
class KVSite:
    """One attention site: the nodes reading K and V, and their stored bytes in the analysed graph."""

    nodes: str          # "bmm/bmm_1" (scores / probs@V matmuls) or the fused attention node's name
    k_bytes: int
    v_bytes: int
    kv_len: int         # positions of K/V in the analysed graph (the scores' last dim)


def _nbytes(val: Any) -> int:
    return sum(v.numel() * v.element_size() for v in pytree.tree_leaves(val) if isinstance(v, torch.Tensor))


def _name(n: fx.Node) -> str:
    return op_name(n.target)[1] if n.op == "call_function" else ""


def _stored(n: Any, weights: set) -> tuple[int, bool]:
    """(bytes of the smallest tensor `n` is a layout/scale copy of, whether that chain starts at a weight)."""
    best = _nbytes(n.meta.get("val")) if isinstance(n, fx.Node) else 0
    while isinstance(n, fx.Node) and n.op == "call_function":
        ins = n.all_input_nodes
        if len(ins) != 1 or not (is_view_target(n.target) or _name(n) in _COPIES):
            break
        n = ins[0]
        b = _nbytes(n.meta.get("val"))
        best = min(best, b) if b else best
    return best, isinstance(n, fx.Node) and n in weights


def _shape(n: Any) -> tuple:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def attention_sites(gm: fx.GraphModule, weight_names: set[str] | None = None, depth: int = 24) -> list[KVSite]:
    """The attention sites of `gm` (see the module docstring). `weight_names` are the placeholders bound
    to parameters/buffers/constants: a matmul with a weight operand is a projection, not attention."""
    weights = {n for n in gm.graph.nodes if n.op == "get_attr"
               or (n.op == "placeholder" and weight_names is not None and n.name in weight_names)}
    sites: list[KVSite] = []
    used: set[fx.Node] = set()
    for n in gm.graph.nodes:
        name = _name(n)
        if name in _SDPA and len(n.args) >= 3:
            (kb, _), (vb, _) = _stored(n.args[1], weights), _stored(n.args[2], weights)
            sites.append(KVSite(n.name, kb, vb, (_shape(n.args[1]) or (0, 0))[-2]))
            continue
        if name not in _MATMUL or n in used or len(n.args) < 2:
            continue
        kb, k_weight = _stored(n.args[1], weights)
        if k_weight or _stored(n.args[0], weights)[1]:
            continue
        # forward from the scores to the next matmul, which must take (a softmax of) them on the left
        reach, frontier, soft = {n}, [n], False
        for _ in range(depth):
            frontier = [u for f in frontier for u in f.users if u not in reach and _name(u) not in _MATMUL]
            reach.update(frontier)
            soft = soft or any(_name(u) in _SOFTMAX for u in frontier)
            if not frontier:
                break
        pv = [u for r in reach for u in r.users
              if _name(u) in _MATMUL and u is not n and u not in used and u.args and u.args[0] in reach]
        if not soft or not pv:
            continue
        b = min(pv, key=lambda u: list(gm.graph.nodes).index(u))
        vb, v_weight = _stored(b.args[1], weights)
        if v_weight:
            continue
        used.update((n, b))
        sites.append(KVSite(f"{n.name}/{b.name}", kb, vb, (_shape(n) or (0,))[-1]))
    return sites


def kv_bytes_per_token_from_config(model: torch.nn.Module) -> float | None:
    """K and V bytes per (batch element, position) from a Hugging Face config, None without one."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None

    def first(*names: str) -> Any:
        for a in names:
            v = getattr(cfg, a, None)
            if isinstance(v, int) and v > 0:
                return v
        return None

    layers = first("num_hidden_layers", "n_layer", "num_layers")
    heads = first("num_attention_heads", "n_head")
    if not (layers and heads):
        return None
    kv_heads = first("num_key_value_heads", "n_kv_heads") or heads
    head_dim = first("head_dim") or (first("hidden_size", "n_embd", "d_model") or 0) // heads
    p = next(iter(model.parameters()), None)
    item = p.element_size() if p is not None else 4
    return float(2 * layers * kv_heads * head_dim * item)


def peak_activation_bytes(gm: fx.GraphModule, size: Callable[[fx.Node], int] | None = None) -> int:
    """Peak bytes of live intermediate values (call_function and call_module results) when `gm` runs in
    order. A view or getitem aliases its base: it adds no bytes and keeps the base alive until its own
    last use. Graph outputs stay live to the end."""
    size = size or (lambda n: _nbytes(n.meta.get("val")))
    order = list(gm.graph.nodes)
    base: dict[fx.Node, fx.Node] = {}
    for n in order:
        aliasing = n.op == "call_function" and (
            n.target is operator.getitem or (isinstance(n.target, torch._ops.OpOverload) and n.target.is_view))
        src = n.args[0] if aliasing and n.args and isinstance(n.args[0], fx.Node) else None
        base[n] = base.get(src, src) if src is not None else n
    last: dict[fx.Node, int] = {}
    for i, n in enumerate(order):
        for a in n.all_input_nodes:
            last[base[a]] = i
    live = peak = 0
    sizes: dict[fx.Node, int] = {}
    for i, n in enumerate(order):
        if n.op in ("call_function", "call_module") and base[n] is n:
            sizes[n] = size(n)
            live += sizes[n]
            peak = max(peak, live)
        for a in {base[a] for a in n.all_input_nodes}:
            if last.get(a) == i and n.op != "output":
                live -= sizes.pop(a, 0)
    return peak


def resized_inputs(inputs: Sequence[Any], batch0: int, seq0: int, batch: int, seq: int) -> tuple:
    """The example inputs at another (batch, seq): dim 0 equal to the example batch becomes `batch`, any
    other dim equal to the example sequence length becomes `seq` (values: zeros; only shapes matter)."""
    def one(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        shape = [batch if (i == 0 and d == batch0) else seq if d == seq0 else d for i, d in enumerate(t.shape)]
        return torch.zeros(shape, dtype=t.dtype, device=t.device)

    return tuple(pytree.tree_map(one, list(inputs)))


def peak_activations_at(model: torch.nn.Module, inputs: Sequence[Any], batch0: int, seq0: int,
                        batch: int, seq: int) -> int | None:
    """Peak activation bytes of one forward at (batch, seq), from a fresh capture (None if it fails)."""
    from fusion.capture import capture_module

    try:
        return peak_activation_bytes(capture_module(model, resized_inputs(inputs, batch0, seq0, batch, seq)).gm)
    except Exception:  # noqa: BLE001 - a shape the model cannot take (e.g. past its position table)
        return None


def _unit(nbytes: float) -> tuple[float, str]:
    for scale, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if nbytes >= scale:
            return float(scale), unit
    return 1.0, "B"


def fmt_bytes(nbytes: float | None) -> str:
    if nbytes is None:
        return "-"
    scale, unit = _unit(nbytes)
    return f"{nbytes / scale:.1f} {unit}" if unit != "B" else f"{nbytes:.0f} B"


def draw_memory_plot(path: str, seqs: Sequence[int], weights: float, activations: Sequence[float | None],
                     kv: Sequence[float] | None, title: str, kv_label: str) -> str:
    """Stacked areas over sequence length: weights, peak activations, KV cache; total marked per point.
    Without matplotlib: FusionInputError saying to install the `plot` extra."""
    from fusion.analysis.plots import _pyplot

    plt = _pyplot()
    act = [a if a is not None else float("nan") for a in activations]
    kvs = list(kv) if kv is not None else [0.0] * len(seqs)
    totals = [weights + (a if a == a else 0.0) + k for a, k in zip(act, kvs)]
    scale, unit = _unit(max(totals))
    w = [weights / scale] * len(seqs)
    a_top = [x + (y / scale if y == y else 0.0) for x, y in zip(w, act)]
    k_top = [x + y / scale for x, y in zip(a_top, kvs)]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.fill_between(seqs, 0, w, color="#4c72b0", alpha=0.85, label=f"weights ({weights / scale:.3g} {unit})")
    ax.fill_between(seqs, w, a_top, color="#dd8452", alpha=0.85, label="peak activations (one forward)")
    if kv is not None:
        ax.fill_between(seqs, a_top, k_top, color="#55a868", alpha=0.85, label=kv_label)
    ax.plot(seqs, k_top, "k.-", lw=1, label="total")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(seqs))
    ax.set_xticklabels([str(s) for s in seqs])
    ax.set_xlim(min(seqs), max(seqs))
    ax.set_ylim(0, max(k_top) * 1.08)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel(f"memory ({unit})")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
