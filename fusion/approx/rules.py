"""Where approximate rewrites apply (sites) and what each one emits.

A `Site` is found on the exact graph; it knows its anchor node (the node whose value it replaces), the
external input nodes it reads, and how to emit its replacement into any graph (`emit`). The same emitter
builds (a) the approximate program and (b) a one-site mini graph used to measure the site's local error
on the exact program's own intermediate values.

Rules (all off unless named in `Config.approximate`):

- ``int8`` — a linear layer: ``mm`` / ``addmm`` / ``bmm`` whose second operand is a weight placeholder seen
  through ``permute([1,0])`` / ``t`` (nn.Linear, [N,K]) or directly ([K,N], HF Conv1D), possibly broadcast
  over a batch by ``expand`` + ``view`` (what export makes of a linear on a 3-D non-contiguous input).
  Emits ``fusion.quantize_weight_int8(W)`` (a *weight transform*, folded away when the approximation is
  committed: the weight is then converted in place) and either dynamic W8A8 — ``fusion.quantize_rows(x)``
  (per-token activation scales) + ``fusion.int8_matmul`` (per-channel weight scales, `torch._int_mm`,
  dequantization + bias epilogue) — or weight-only int8 (``fusion.int8_weight_only_linear``), whichever
  runs faster on the site's shape (`fusion.approx.cost` times both); weight-only is also W8A8's fallback
  (with ``bf16`` also asked, the bf16 linear is the fallback instead).
- ``bf16`` — any ``mm`` / ``addmm`` / ``bmm`` on fp32: operands cast to bf16 (weights: a weight transform,
  committed in place), the matmul runs in bf16 (oneDNN AVX512-BF16, fp32 accumulation inside the kernel),
  the result is cast back to fp32, so everything around it keeps fp32.
- ``relu_attention`` — ``_softmax(s, -1)`` over the key dim of attention scores (``s`` computed from a
  ``bmm``/``mm`` through scaling/masking/view ops) becomes ``relu(s) / L`` with ``L`` the key length
  (Wortsman et al. 2023, "Replacing softmax with ReLU in Vision Transformers"). This CHANGES THE FUNCTION:
  it is only a valid replacement for models trained with ReLU attention; on a softmax-trained model the
  accuracy guard measures a large error and reverts it.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from fusion.dialect.values import hint
from fusion.approx import ops as approx_ops  # noqa: F401  (registers torch.ops.fusion.int8_*)
from fusion.approx.cost import int8_ladder

aten = torch.ops.aten
fusion_ops = torch.ops.fusion

MATMULS = (aten.mm.default, aten.addmm.default, aten.bmm.default)
#: the int8 forms of every linear site, fastest first, each later one the guard's more accurate fallback for
#: the one before ("int8": dynamic W8A8, per-token activation scales; "int8_weight_only": fp32 activations).
#: None (the default): chosen per site by timing both forms on the site's shape (`fusion.approx.cost`).
INT8_LADDER: Optional[tuple[str, ...]] = None
#: bf16 on an activation x activation matmul pays two input casts and one output cast per call; measured on
#: this CPU, attention-sized bmms (384 x 128x32x128, 384 x 128x128x32) run ~3x SLOWER that way, so such a
#: matmul is a bf16 site only when both its reduction and output dims are at least this large
BF16_MIN_ACT_DIM = 256
RELU_NOTE = ("ReLU attention (relu(s)/L) replaces softmax: exact only for models TRAINED with ReLU attention; "
             "on a softmax-trained model it changes the function")

_LAYOUT_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default}
_SCORE_OPS = {
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor,
    aten.div.Scalar, aten.where.self, aten.view.default, aten._unsafe_view.default, aten.reshape.default,
    aten.expand.default, aten.clone.default, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
    aten._to_copy.default, aten.permute.default,
}


def val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else n


# ----------------------------------------------------------------------------------------------
# emitting nodes with meta["val"]


class Emitter:
    """Creates call_function nodes in `g` and fills meta["val"] by running the op on fake values."""

    def __init__(self, g: fx.Graph, fake_mode: Any):
        self.g = g
        self.fake_mode = fake_mode

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        node = self.g.call_function(target, args, kwargs)
        if self.fake_mode is not None:
            fa, fk = fx.node.map_arg((args, kwargs), lambda n: n.meta.get("val"))
            try:
                with self.fake_mode:
                    node.meta["val"] = target(*fa, **fk)
            except Exception:  # noqa: BLE001 - meta is best effort for ops fake mode cannot run
                pass
        return node


# ----------------------------------------------------------------------------------------------
# sites


@dataclass
class Site:
    name: str
    kind: str                       # "int8" | "int8_weight_only" | "bf16" | "relu_attention"
    anchor: str                     # node of the exact graph whose value this site replaces
    inputs: list[str]               # external input nodes (names in the exact graph)
    emit: Callable[[Emitter, list[fx.Node]], fx.Node]
    nodes: list[str] = field(default_factory=list)   # exact-graph nodes replaced (anchor + weight path)
    weight: Optional[str] = None    # weight placeholder converted by this site, if any
    note: str = ""
    flops: int = 0
    fallback: Optional["Site"] = None   # a more accurate variant the guard tries before reverting
    kn: Optional[bool] = None           # the weight's layout ([K,N] True, [N,K] False) when it has one


def _weight_operand(b: fx.Node, weights: dict[str, torch.Tensor]) -> Optional[tuple[fx.Node, bool, list[fx.Node]]]:
    """If matmul operand `b` is a weight matrix seen through layout ops, (placeholder, kn, path nodes).

    kn=False: the placeholder is [N, K] and b = W^T (nn.Linear); kn=True: the placeholder is [K, N] and b = W.
    """
    path: list[fx.Node] = []
    bv = val(b)
    if bv is None:
        return None
    k, n = bv.shape[-2], bv.shape[-1]
    cur = b
    while isinstance(cur, fx.Node) and cur.op == "call_function" and cur.target in _LAYOUT_OPS:
        cv = val(cur.args[0])
        if cv is None or cv.dim() < 2 or tuple(cv.shape[-2:]) != (k, n):
            return None
        if cur.target is aten.expand.default and any(s != 1 for s in cv.shape[:-2]):
            return None
        path.append(cur)
        cur = cur.args[0]
    if not isinstance(cur, fx.Node) or val(cur) is None or val(cur).dim() != 2:
        return None
    if cur.op == "placeholder":
        w, kn = cur, True
    elif (cur.op == "call_function" and cur.target in (aten.permute.default, aten.t.default)
          and isinstance(cur.args[0], fx.Node) and cur.args[0].op == "placeholder"
          and (cur.target is aten.t.default or list(cur.args[1]) in ([1, 0], [-1, -2], [-1, 0], [1, -2]))):
        path.append(cur)
        w, kn = cur.args[0], False
    else:
        return None
    t = weights.get(w.name)
    if t is None or t.dtype != torch.float32 or t.dim() != 2:
        return None
    return w, kn, path


def _matmul_parts(node: fx.Node) -> Optional[tuple[Optional[fx.Node], fx.Node, fx.Node]]:
    """(bias, a, b) of mm/addmm/bmm, or None for forms we do not rewrite (beta/alpha != 1)."""
    if node.target is aten.addmm.default:
        if len(node.args) > 3 or any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")):
            return None
        bias, a, b = node.args[:3]
        return bias, a, b
    if len(node.args) != 2 or node.kwargs:
        return None
    return None, node.args[0], node.args[1]


def _is_fp32(n: Any) -> bool:
    v = val(n)
    return isinstance(v, torch.Tensor) and v.dtype == torch.float32


def linear_sites(gm: fx.GraphModule, weights: dict[str, torch.Tensor], kinds: frozenset[str]) -> list[Site]:
    """int8 sites on linear layers (when "int8" is asked), bf16 sites on every other fp32 matmul (when "bf16")."""
    sites: list[Site] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in MATMULS or not _is_fp32(node):
            continue
        parts = _matmul_parts(node)
        if parts is None:
            continue
        bias, a, b = parts
        if not (_is_fp32(a) and _is_fp32(b)) or (bias is not None and not _is_fp32(bias)):
            continue
        wop = _weight_operand(b, weights)
        out_v = val(node)
        rows = hint(out_v.numel()) // hint(out_v.shape[-1])
        k = hint(val(a).shape[-1])
        flops = 2 * rows * k * hint(out_v.shape[-1])
        if "int8" in kinds and wop is not None:
            w, kn, path = wop
            bias_ok = bias is None or (val(bias).dim() == 1 and val(bias).shape[0] == out_v.shape[-1])
            times = None
            ladder = INT8_LADDER
            if ladder is None:
                ladder, times = int8_ladder(rows, k, hint(out_v.shape[-1]))
            if "bf16" in kinds:   # bf16 is the fallback: faster than weight-only int8 and about as accurate
                ladder = tuple(i for i in ladder if i != "int8_weight_only") or ladder
            chain = [_int8_site(node, a, w, kn, bias, bias_ok, impl, path, flops, times) for impl in ladder]
            if "bf16" in kinds:
                chain.append(_bf16_site(node, bias, a, b, wop, flops))
            for s, nxt in zip(chain, chain[1:]):
                s.fallback = nxt
            sites.append(chain[0])
        elif "bf16" in kinds and (wop is not None or min(k, hint(out_v.shape[-1])) >= BF16_MIN_ACT_DIM):
            sites.append(_bf16_site(node, bias, a, b, wop, flops))
    return sites


def _shape_args(e: Emitter, out_shape: list, x: fx.Node) -> list:
    """`out_shape` (a linear's output [..., N]) as view arguments: a symbolic leading dim (torch.compile's
    dynamic shapes) is read at run time from the input `x` [..., K], whose leading dims are the output's."""
    return [d if isinstance(d, int) else e(aten.sym_size.int, x, i) for i, d in enumerate(out_shape)]


def _int8_site(node, a, w, kn, bias, bias_ok, impl, path, flops, times=None) -> Site:
    kind = "int8_weight_only" if impl == "int8_weight_only" else "int8"
    inputs = [a.name, w.name] + ([bias.name] if bias is not None else [])
    out_shape = list(val(node).shape)

    def emit(e: Emitter, ins: list[fx.Node]) -> fx.Node:
        x, wt = ins[0], ins[1]
        qt = e(fusion_ops.quantize_weight_int8.default, wt, kn)
        qt.meta["approx_weight_transform"] = "int8"
        wq = e(operator.getitem, qt, 0)
        ws = e(operator.getitem, qt, 1)
        b = ins[2] if len(ins) > 2 else None
        if impl == "int8":   # per-token quantization, then the GEMM with its dequantization epilogue
            xq = e(fusion_ops.quantize_rows.default, x)
            y = e(fusion_ops.int8_matmul.default, e(operator.getitem, xq, 0), e(operator.getitem, xq, 1), wq, ws,
                  b if bias_ok else None, kn, "none")
            if len(out_shape) != 2:
                y = e(aten.view.default, y, _shape_args(e, out_shape, x))
        else:
            y = e(fusion_ops.int8_weight_only_linear.default, x, wq, ws, b if bias_ok else None, kn)
        if b is not None and not bias_ok:
            y = e(aten.add.Tensor, y, b)
        return y

    what = {
            "int8": "dynamic W8A8 (per-token activation scales, per-channel weight scales; torch._int_mm, "
                    "one-pass quantization and dequantization kernels)",
            "int8_weight_only": "weight-only int8 (few rows: _weight_int8pack_mm; else dequantize + fp32 GEMM)"}[impl]
    return Site(f"{impl}:{node.name}", kind, node.name, inputs, emit,
                nodes=[node.name] + [p.name for p in path], weight=w.name,
                note=f"{what}; weight {w.name} {'[K,N]' if kn else '[N,K]'} converted in place to int8{_timed(times)}",
                flops=flops, kn=kn)


def _timed(times: Optional[dict[str, float]]) -> str:
    if not times:
        return ""
    return "; measured on this shape: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items())


def _bf16_site(node, bias, a, b, wop, flops) -> Site:
    target = node.target
    out_shape = list(val(node).shape)
    inputs = ([bias.name] if bias is not None else []) + [a.name] + [wop[0].name if wop is not None else b.name]
    path = wop[2] if wop is not None else []

    def emit(e: Emitter, ins: list[fx.Node]) -> fx.Node:
        bf = torch.bfloat16
        it = iter(ins)
        bias_in = next(it) if bias is not None else None
        aa = e(aten._to_copy.default, next(it), dtype=bf)
        if wop is not None:   # a linear: bf16 GEMM, bias (fp32) in the epilogue
            cast = e(aten._to_copy.default, next(it), dtype=bf)
            cast.meta["approx_weight_transform"] = "bf16"
            y = e(fusion_ops.bf16_linear.default, aa, cast, bias_in, wop[1], "none", False)
            return e(aten.view.default, y, _shape_args(e, out_shape, aa)) if len(out_shape) != 2 else y
        bb = e(aten._to_copy.default, next(it), dtype=bf)
        y = e(target, e(aten._to_copy.default, bias_in, dtype=bf), aa, bb) if bias_in is not None else e(target, aa, bb)
        return e(aten._to_copy.default, y, dtype=torch.float32)

    note = "bf16 matmul (oneDNN AVX512-BF16; fp32 accumulation in the kernel, bf16 output cast back to fp32)"
    if wop is not None:
        note = (f"bf16 linear (oneDNN AVX512-BF16, fp32 accumulation; bias and activation in fp32 in one epilogue "
                f"pass); weight {wop[0].name} converted in place to bf16")
    return Site(f"bf16:{node.name}", "bf16", node.name, inputs, emit,
                nodes=[node.name] + [p.name for p in path], weight=wop[0].name if wop else None, note=note, flops=flops,
                kn=wop[1] if wop else None)


def _scores_from_matmul(x: fx.Node, depth: int = 8) -> bool:
    """Does `x` come from a matmul through scaling / masking / layout ops only (along some path)?"""
    frontier = [x]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if not isinstance(n, fx.Node) or n.op != "call_function":
                continue
            if n.target in (aten.bmm.default, aten.mm.default, aten.matmul.default):
                return True
            if n.target in _SCORE_OPS:
                nxt += [a for a in n.args if isinstance(a, fx.Node) and _is_float(a)]
        frontier = nxt
    return False


def _is_float(n: fx.Node) -> bool:
    v = val(n)
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point


def relu_attention_sites(gm: fx.GraphModule) -> list[Site]:
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten._softmax.default:
            continue
        x, dim, half_to_float = node.args
        xv = val(x)
        if xv is None or half_to_float or dim not in (-1, xv.dim() - 1) or not _scores_from_matmul(x):
            continue
        length = hint(xv.shape[-1])
        static = isinstance(xv.shape[-1], int)   # else (dynamic shapes) L is read at run time

        def emit(e: Emitter, ins: list[fx.Node], length: int = length, static: bool = static,
                 last: int = xv.dim() - 1) -> fx.Node:
            r = e(aten.relu.default, ins[0])
            if static:
                return e(aten.div.Scalar, r, float(length))
            # L as a 0-d tensor (generated kernels load tensors, not symbolic scalars)
            n = e(aten.scalar_tensor.default, e(aten.sym_size.int, ins[0], last), dtype=torch.float32)
            return e(aten.div.Tensor, r, n)

        sites.append(Site(f"relu_attention:{node.name}", "relu_attention", node.name, [x.name], emit,
                          nodes=[node.name], note=f"{RELU_NOTE}; L={length}"))
    sites += _fused_attention_sites(gm)
    return sites


def _fused_attention_sites(gm: fx.GraphModule) -> list[Site]:
    """fusion.attention (captured SDPA, or the exact attention rule's result) -> fusion.relu_attention."""
    fused = getattr(getattr(torch.ops, "fusion", None), "attention", None)
    if fused is None:
        return []
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not fused.default:
            continue
        q, k, v, mask, scale, causal = node.args
        length = hint(val(k).shape[-2])   # (for the note: the op reads L from k at run time)
        tensors = [a for a in (q, k, v, mask) if isinstance(a, fx.Node)]

        def emit(e: Emitter, ins: list[fx.Node], mask_given: bool = isinstance(mask, fx.Node),
                 scale: float = scale, causal: bool = causal) -> fx.Node:
            qq, kk, vv = ins[:3]
            mm = ins[3] if mask_given else None
            return e(torch.ops.fusion.relu_attention.default, qq, kk, vv, mm, scale, causal)

        sites.append(Site(f"relu_attention:{node.name}", "relu_attention", node.name, [t.name for t in tensors], emit,
                          nodes=[node.name], note=f"{RELU_NOTE}; L={length} (fused attention)"))
    return sites


def find_sites(gm: fx.GraphModule, weights: dict[str, torch.Tensor], kinds: frozenset[str]) -> list[Site]:
    sites: list[Site] = []
    if "relu_attention" in kinds:
        sites += relu_attention_sites(gm)
    if kinds & {"int8", "bf16"}:
        sites += linear_sites(gm, weights, kinds)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    sites.sort(key=lambda s: order[s.anchor])
    return sites
