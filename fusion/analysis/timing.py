"""Where a program's time goes: every node timed alone (`measure_nodes`), its FLOPs and bytes from the cost
model (`graph_stats` -> NodeStats), and the split of the measured time into GEMMs, attention, fused kernels
and everything else (`time_split`), with the program's fraction of its GEMM roofline.

GEMM roofline: the GEMM FLOPs of the program run at the best fp32 GEMM rate measured on this machine —
the calibrated profile's faster library at its square product, or the tuning cache's rate at the node's own
shape where that is higher (fusion/passes/gemm.py measured it). Its time over the program's measured time
is the fraction: 1.0 means nothing but GEMMs at the best rate this CPU showed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from fusion.costmodel.hardware import ONEDNN_KEY

_FREE = {"placeholder", "output", "get_attr"}


@dataclass
class NodeStats:
    name: str
    op: str
    flops: float            # FLOPs (a multiply-add = 2), matmul FLOPs included
    bytes_read: float
    bytes_written: float
    transcendentals: float
    predicted_s: float
    measured_s: float | None = None
    kind: str = "aten"      # "aten" (an ATen call) | "kernel" (a generated fused kernel) | "view"
    gemm_flops: float = 0.0  # the part of `flops` done by matrix multiplies

    @property
    def macs(self) -> float:
        return self.flops / 2

    @property
    def bytes(self) -> float:
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else float("inf")



def _meta_like(value: Any) -> Any:
    """`value` with every tensor replaced by a meta-device tensor of its shape, stride and dtype."""
    if isinstance(value, torch.Tensor) and value.layout == torch.strided:
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    if isinstance(value, tuple):
        return tuple(_meta_like(v) for v in value)
    if isinstance(value, list):
        return [_meta_like(v) for v in value]
    return value


def measure_nodes(gm: fx.GraphModule, args: Sequence[Any], repeat: int = 3, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each node run alone (after its first run) as the graph runs node by node, after
    `warmup` calls of the whole graph (first calls pay one-time costs: allocator, thread pool, caches)."""
    times: dict[str, float] = {}
    with torch.no_grad():
        for _ in range(warmup):
            gm(*args)

    class Timer(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if "val" not in n.meta:       # a program restored without its example values (the structural
                n.meta["val"] = _meta_like(out)   # cache): its shapes, so its FLOPs are counted as the fresh one's
            if n.op in _FREE:
                return out
            samples = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                super().run_node(n)
                samples.append(time.perf_counter() - t0)
            times[n.name] = sorted(samples)[len(samples) // 2]
            return out

    with torch.no_grad():
        Timer(gm).run(*args)
    return times


def graph_stats(gm: fx.GraphModule, args: Sequence[Any] | None, hw: Any, kernels: dict | None = None,
                program_gm: fx.GraphModule | None = None, repeat: int = 3) -> tuple[list[NodeStats], dict]:
    """NodeStats of every call of `gm` (ATen calls, views, generated kernels described by `kernels`:
    name -> lower.KernelInfo) and the totals; measured when `args` (the flat graph inputs) are given."""
    from fusion.costmodel.program_cost import program_cost

    measured = measure_nodes(gm, args, repeat) if args is not None else {}
    by_name = {n.name: n for n in gm.graph.nodes}
    stats = []
    for name, c in program_cost(gm, kernels, program_gm):
        n = by_name[name]
        if n.op == "call_module":
            kind, op = "kernel", f"fused[{len(kernels[n.target].nodes)}]"
        else:
            kind = "view" if c.view_calls and not c.calls else "aten"
            op = getattr(n.target, "__name__", str(n.target))
        stats.append(NodeStats(name, op, c.flops + c.gemm_flops, c.bytes_read, c.bytes_written, c.transcendentals,
                               c.time(hw), measured.get(name), kind, c.gemm_flops))
    calls = [s for s in stats if s.kind != "view"]
    totals = {
        "flops": sum(s.flops for s in stats),
        "gemm_flops": sum(s.gemm_flops for s in stats),
        "bytes": sum(s.bytes for s in stats),
        "transcendentals": sum(s.transcendentals for s in stats),
        "kernels": len(calls),
        "fused_kernels": sum(1 for s in calls if s.kind == "kernel"),
        "aten_calls": sum(1 for s in calls if s.kind == "aten"),
        "view_calls": len(stats) - len(calls),
        "predicted_s": getattr(hw, "graph_call_overhead", 0.0) + sum(s.predicted_s for s in stats),
        "measured_s": sum(s.measured_s for s in stats if s.measured_s) if measured else None,
    }
    return stats, totals




#: the calibrated fp32 rates (fusion.costmodel.calibrate) of plain matrix products: ATen/MKL and oneDNN
GEMM_RATE_KEYS = ("float32", ONEDNN_KEY)
ATTENTION_OPS = ("attention.", "scaled_dot_product", "_scaled_dot_product", "decomposed_attention")
_LINEARS = {"mm.default": "mm", "addmm.default": "addmm", "_linear_pointwise.default": "linear"}


def _category(s: NodeStats) -> str:
    if s.kind == "kernel":
        return "fused"
    if s.op.startswith(ATTENTION_OPS):
        return "attention"
    if s.gemm_flops > 0:
        return "gemm"
    return "other"


def _shape_rate(node: fx.Node, tuner: Any, hw: Any) -> float | None:
    """FLOP/s of the fastest library the tuning cache holds for this fp32 linear's own shape (no measuring)."""
    kind = _LINEARS.get(getattr(node.target, "__name__", ""))
    out = node.meta.get("val")
    if kind is None or tuner is None or not isinstance(out, torch.Tensor) or out.dim() != 2:
        return None
    x = node.args[1] if kind == "addmm" else node.args[0]
    b = node.args[2] if kind == "addmm" else node.args[1]
    xv, bv = getattr(x, "meta", {}).get("val"), getattr(b, "meta", {}).get("val")
    if not (isinstance(xv, torch.Tensor) and isinstance(bv, torch.Tensor)) or out.dtype != torch.float32:
        return None
    try:
        m, k = (int(d) for d in xv.shape)
        n = int(out.shape[1])
    except (TypeError, ValueError):  # symbolic sizes: no per-shape record
        return None
    has_bias = kind == "addmm" or (kind == "linear" and node.args[2] is not None)
    transposed = kind == "linear" or (isinstance(b, fx.Node) and b.target is torch.ops.aten.permute.default)
    times = tuner.times(m, k, n, has_bias, "nt" if transposed else "nn", hw)
    return 2.0 * m * k * n / min(times.values()) if times else None


def time_split(gm: fx.GraphModule, stats: Sequence[NodeStats], hw: Any, cache_dir: str | None = None) -> dict[str, Any]:
    """The measured time of `stats` (graph_stats of `gm` with inputs) as GEMM / attention / fused-kernel /
    other seconds, and the GEMM roofline: `gemm_roofline_s` (the GEMM FLOPs at the best rate measured
    here, per node the higher of the profile's and its shape's tuning record) and its fraction of the
    measured total. Attention FLOPs count as GEMM FLOPs (its two products)."""
    from fusion.passes.gemm import GemmTuner

    rates = getattr(hw, "gemm_flops", None) or {}
    # the matrix-product rates only: attention's calibrated rate counts the FLOPs a causal kernel skips
    best = max([rates[key] for key in GEMM_RATE_KEYS if rates.get(key)] or [1e11])
    tuner = GemmTuner(cache_dir, measure=False)
    by_name = {n.name: n for n in gm.graph.nodes}
    split = {"gemm": 0.0, "attention": 0.0, "fused": 0.0, "other": 0.0}
    ideal = 0.0
    for s in stats:
        if s.measured_s is not None:
            split[_category(s)] += s.measured_s
        if s.gemm_flops:
            rate = _shape_rate(by_name[s.name], tuner, hw) if s.name in by_name else None
            ideal += s.gemm_flops / max(best, rate or 0.0)
    total = sum(split.values())
    return {**{f"{k}_s": v for k, v in split.items()}, "total_s": total,
            "gemm_flops": sum(s.gemm_flops for s in stats), "gemm_roofline_s": ideal,
            "gemm_roofline_fraction": ideal / total if total else None}


def format_split(split: dict[str, Any]) -> str:
    """One line per bucket (time and share of the measured total) and the GEMM-roofline line."""
    total = split["total_s"] or 1e-30
    lines = [f"{name:<10} {split[name + '_s'] * 1e3:9.2f} ms  {100 * split[name + '_s'] / total:5.1f}%"
             for name in ("gemm", "attention", "fused", "other")]
    lines.append(f"{'total':<10} {split['total_s'] * 1e3:9.2f} ms  (each node timed alone, summed)")
    if split["gemm_flops"]:
        lines.append(f"GEMM roofline: {split['gemm_flops'] / 1e9:.2f} GFLOP at the best fp32 GEMM rate measured "
                     f"here = {split['gemm_roofline_s'] * 1e3:.2f} ms, {split['gemm_roofline_fraction']:.2f} "
                     "of the measured total")
    return "\n".join(lines)
