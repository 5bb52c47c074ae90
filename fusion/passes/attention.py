"""Attention implementation choice: each CPU `fusion.attention` call runs the form measured fastest at its shape.

`fusion.attention(q, k, v, mask, scale, causal)` runs PyTorch's fused SDPA kernel (and its causal path
when the mask is causal; fusion/dialect/ops.py). Whether that beats the plain decomposition

    softmax(q @ k^T * scale + mask) @ v          (two batched GEMMs on MKL and one softmax)

depends on the CPU, the head size, the lengths and the mask: the fused kernel never materialises the
[.., S, L] scores but walks them in blocks; the decomposition runs two large GEMMs at the GEMM library's
rate. So, as for GEMMs (fusion/passes/gemm.py), both are timed on fresh operands of the call's own shapes
(grouped-query heads and the mask's broadcast shape included) and the result is kept in the tuning cache
of this CPU (fusion/costmodel/tuning.py); without a measurement (Config(tune=False), the budget spent,
symbolic sizes, other dtypes or devices) the call stays on SDPA. The pass rewrites

    fusion.attention(q, k, v, mask, scale, causal)  ->  decomposed_attention(q, k, v, mask, scale, causal)

only where the decomposition measured at most MEASURED_GAIN of SDPA's time. Both compute the same function
(another summation order: relative differences ~1e-6 in fp32).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, fx

#: the decomposition must measure below this fraction of SDPA's time to replace it (noise margin; SDPA
#: keeps memory linear in L, so a tie goes to it)
MEASURED_GAIN = 0.9


def decomposed_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, causal: bool) -> Tensor:
    """fusion.attention as two batched GEMMs and a softmax. Grouped-query heads are read in place: q's
    heads are viewed as [.., Hkv, G*S, D] against k's [.., Hkv, L, D] (no repeated k/v)."""
    h, hkv, s, l_ = q.shape[-3], k.shape[-3], q.shape[-2], k.shape[-2]
    g = h // hkv
    lead = q.shape[:-3]
    qg = q.reshape(*lead, hkv, g * s, q.shape[-1]) if g > 1 else q
    scores = torch.matmul(qg, k.transpose(-1, -2)).mul_(scale)
    if g > 1:
        scores = scores.view(*lead, h, s, l_)
    if causal:
        keep = torch.ones(s, l_, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:   # SDPA gives 0 where a row's every key is masked (softmax alone: nan)
        dead = ~mask.any(-1, keepdim=True) if mask.dtype == torch.bool else torch.isneginf(mask).all(-1, keepdim=True)
        probs = probs.masked_fill(dead, 0.0)
    if g > 1:
        out = torch.matmul(probs.reshape(*lead, hkv, g * s, l_), v)
        return out.view(*lead, h, s, v.shape[-1])
    return torch.matmul(probs, v)


def _static(shape: Any) -> tuple[int, ...] | None:
    return tuple(shape) if all(isinstance(d, int) for d in shape) else None


class AttentionTuner:
    """Measured SDPA-vs-decomposed times of CPU attention calls, by shapes, mask, causality and dtype."""

    def __init__(self, cache_dir: str | None, budget: Any):
        self.cache_dir, self.budget = cache_dir, budget

    @staticmethod
    def key(q: tuple, k: tuple, v: tuple, mask: tuple | None, mask_dtype: str, causal: bool, dtype: str) -> str:
        return f"{dtype} q{list(q)} k{list(k)} v{list(v)} mask{list(mask) if mask else None}:{mask_dtype} causal={int(causal)}"

    def times(self, q: tuple, k: tuple, v: tuple, mask: tuple | None, mask_dtype: torch.dtype | None,
              causal: bool, scale: float, dtype: torch.dtype) -> dict[str, float] | None:
        from fusion.costmodel import tuning

        proxy = _proxy(q, k, v, mask, torch.empty((), dtype=dtype).element_size())
        if proxy is None:
            return None
        (pq, pk, pv, pm), share = proxy
        flops = 4.0 * math.prod(pq[:-1]) * k[-2] * q[-1]
        predicted = 2 * (tuning.ROUNDS + 1) * (flops / 1e11 + 2e-5)
        key = self.key(q, k, v, mask, str(mask_dtype).replace("torch.", ""), causal, str(dtype).replace("torch.", ""))
        return tuning.fastest("attention", key, lambda: _candidates(pq, pk, pv, pm, mask_dtype, causal, scale, dtype),
                              self.cache_dir, self.budget, predicted, scale=share)


def _proxy(q: tuple, k: tuple, v: tuple, mask: tuple | None, itemsize: int) -> tuple[tuple, float] | None:
    """The shapes to time, and the share of the call's work they do: the call's own, or for a [B, H, S, D]
    call whose operands and scores would pass tuning.MAX_MEASURE_BYTES, fewer batch rows, then fewer kv
    heads (with their G query heads each) — per (batch, kv head) the work is the same. None when even one
    of them is too big, or the mask's shape does not fold with them."""
    from fusion.costmodel import tuning

    def size(b: int, hk: int) -> int:
        g = q[1] // k[1]
        return itemsize * b * (hk * g * (q[2] * q[3] + 2 * q[2] * k[2]) + hk * (k[2] * k[3] + v[2] * v[3]))

    if len(q) != 4 or len(k) != 4 or len(v) != 4 or q[1] % k[1]:
        whole = itemsize * (math.prod(q) + math.prod(k) + math.prod(v) + 2 * math.prod(q[:-1]) * k[-2])
        return ((q, k, v, mask), 1.0) if whole <= tuning.MAX_MEASURE_BYTES else None
    b, hk, g = q[0], k[1], q[1] // k[1]
    while size(b, hk) > tuning.MAX_MEASURE_BYTES and (b > 1 or hk > 1):
        b, hk = (max(1, b // 2), hk) if b > 1 else (b, max(1, hk // 2))
    if size(b, hk) > tuning.MAX_MEASURE_BYTES:
        return None
    pm = mask
    if mask is not None and (b, hk) != (q[0], k[1]):
        full = (1,) * (4 - len(mask)) + tuple(mask)
        if full[0] not in (1, q[0]) or full[1] not in (1, q[1]):
            return None
        pm = (min(full[0], b), full[1] if full[1] == 1 else hk * g, *full[2:])
    shapes = ((b, hk * g, q[2], q[3]), (b, hk, k[2], k[3]), (b, hk, v[2], v[3]), pm)
    return shapes, (q[0] * k[1]) / (b * hk)


def _mask(shape: tuple, dtype: torch.dtype, s: int, l_: int) -> Tensor:
    """A mask of the call's shape and dtype. Where it spans the whole [S, L] score matrix it holds the
    causal mask (SDPA then measures its fast causal path, as fusion.attention takes it at run time for a
    causal mask; a mask that is not causal only makes SDPA slower than measured, never the decomposition)."""
    if len(shape) >= 2 and tuple(shape[-2:]) == (s, l_) and s > 1:
        keep = torch.ones(s, l_, dtype=torch.bool).tril().expand(shape).contiguous()
        if dtype == torch.bool:
            return keep
        return torch.zeros(shape, dtype=dtype).masked_fill_(~keep, float("-inf"))
    if dtype == torch.bool:
        return torch.rand(shape) > 0.1
    return torch.randn(shape, dtype=dtype)


def _candidates(q: tuple, k: tuple, v: tuple, mask: tuple | None, mask_dtype: torch.dtype | None, causal: bool,
                scale: float, dtype: torch.dtype) -> dict[str, Any]:
    qq, kk, vv = (torch.randn(s, dtype=dtype) for s in (q, k, v))
    m = None if mask is None else _mask(mask, mask_dtype or dtype, q[-2], k[-2])
    sdpa = torch.ops.fusion.attention.default           # what the program calls
    return {"sdpa": lambda: sdpa(qq, kk, vv, m, scale, causal),
            "decomposed": lambda: decomposed_attention(qq, kk, vv, m, scale, causal)}


def _site(node: fx.Node) -> tuple | None:
    """(q, k, v, mask shape, mask dtype, causal, scale, dtype) of a CPU attention call with static sizes."""
    q, k, v, mask, scale, causal = (list(node.args) + [None] * 6)[:6]
    vals = [getattr(x, "meta", {}).get("val") for x in (q, k, v)]
    if not all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in vals):
        return None
    if vals[0].dtype not in (torch.float32, torch.bfloat16) or len({t.dtype for t in vals}) != 1:
        return None
    shapes = [_static(t.shape) for t in vals]
    mval = getattr(mask, "meta", {}).get("val") if mask is not None else None
    mshape = _static(mval.shape) if isinstance(mval, torch.Tensor) else None
    if None in shapes or (mask is not None and mshape is None) or not isinstance(scale, float):
        return None
    return (*shapes, mshape, mval.dtype if mshape else None, bool(causal), scale, vals[0].dtype)


def choose_attention(gm: fx.GraphModule, tuner: AttentionTuner | None) -> tuple[fx.GraphModule, dict[str, int]]:
    """Each measured CPU attention call on its faster form; (gm, {"sdpa": n, "decomposed": m}). A new module
    when anything changes (the graph given may be the program as rewritten, which keeps fusion.attention)."""
    counts = {"sdpa": 0, "decomposed": 0}
    decomposed = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.fusion.attention.default:
            continue
        site = _site(node) if tuner is not None else None
        times = tuner.times(*site) if site is not None else None
        if times and "decomposed" in times and times["decomposed"] < MEASURED_GAIN * times["sdpa"]:
            decomposed.add(node.name)
            counts["decomposed"] += 1
        else:
            counts["sdpa"] += 1
    if not decomposed:
        return gm, counts
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    for node in graph.nodes:
        if node.name in decomposed:
            node.target = decomposed_attention
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta.update(getattr(gm, "meta", {}))
    return new, counts
