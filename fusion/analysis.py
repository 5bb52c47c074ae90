"""`fusion.analyze(model, example_inputs)`: FLOPs, bytes, intensity, predicted/measured time and MBU per
node, totals, and memory footprint — the numbers an architect reasons with (seed 004), without optimizing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fusion.capture import capture_module, check_inputs
from fusion.config import Config

_FREE = {"placeholder", "output", "get_attr"}


@dataclass
class NodeStats:
    name: str
    op: str
    flops: float            # FLOPs (a multiply-add = 2)
    bytes_read: float
    bytes_written: float
    transcendentals: float
    predicted_s: float
    measured_s: float | None = None

    @property
    def macs(self) -> float:
        return self.flops / 2

    @property
    def bytes(self) -> float:
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else float("inf")


@dataclass
class Analysis:
    nodes: list[NodeStats]
    weight_bytes: int
    peak_activation_bytes: int
    hw: Any
    totals: dict = field(default_factory=dict)

    def bound(self, s: NodeStats) -> str:
        ridge = self.hw.gemm_flops["float32"] / self.hw.copy_bandwidth
        return "compute" if s.intensity >= ridge else "memory"

    def mbu(self, s: NodeStats) -> float | None:
        """Memory-bandwidth utilisation: achieved bytes/s over the machine's measured copy bandwidth."""
        if not s.measured_s:
            return None
        return s.bytes / s.measured_s / self.hw.copy_bandwidth

    def table(self, top: int | None = None) -> str:
        rows = sorted(self.nodes, key=lambda s: -(s.measured_s or s.predicted_s))[:top]
        head = f"{'node':<28} {'op':<22} {'GFLOP':>8} {'MB':>8} {'FLOP/B':>7} {'pred':>9} {'meas':>9} {'MBU':>5} bound"
        out = [head, "-" * len(head)]
        for s in rows:
            mbu = self.mbu(s)
            out.append(
                f"{s.name[:28]:<28} {s.op[:22]:<22} {s.flops / 1e9:>8.3f} {s.bytes / 1e6:>8.2f} {s.intensity:>7.1f} "
                f"{s.predicted_s * 1e6:>7.1f}us {('%7.1fus' % (s.measured_s * 1e6)) if s.measured_s else '      -':>9} "
                f"{('%.2f' % mbu) if mbu else '-':>5} {self.bound(s)}"
            )
        t = self.totals
        out.append("-" * len(head))
        out.append(
            f"total: {t['flops'] / 1e9:.3f} GFLOP ({t['flops'] / 2e9:.3f} GMAC), {t['bytes'] / 1e6:.1f} MB moved, "
            f"predicted {t['predicted_s'] * 1e3:.2f} ms"
            + (f", measured {t['measured_s'] * 1e3:.2f} ms" if t.get("measured_s") else "")
        )
        out.append(f"memory: weights {self.weight_bytes / 1e6:.1f} MB, peak activations {self.peak_activation_bytes / 1e6:.1f} MB")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    def roofline_plot(self, path: str, title: str = "roofline") -> str:
        """Each node as a point (arithmetic intensity, achieved or predicted FLOP/s) under the machine's roofs."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        peak = self.hw.gemm_flops["float32"]
        bw = self.hw.copy_bandwidth
        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs = [10 ** (i / 10) for i in range(-20, 41)]
        ax.plot(xs, [min(peak, bw * x) for x in xs], "k-", label=f"roof: {bw / 1e9:.0f} GB/s, {peak / 1e9:.0f} GFLOP/s")
        pts = [(s.intensity, s.flops / (s.measured_s or s.predicted_s), s) for s in self.nodes if s.flops > 0 and s.bytes > 0]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, alpha=0.7,
                       label="nodes (measured)" if any(p[2].measured_s for p in pts) else "nodes (predicted)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP / byte)")
        ax.set_ylabel("performance (FLOP / s)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _measure(gm: fx.GraphModule, args: Sequence[Any], repeat: int = 3) -> dict[str, float]:
    times: dict[str, float] = {}

    class Timer(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
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


def _nbytes(val: Any) -> int:
    return sum(v.numel() * v.element_size() for v in pytree.tree_leaves(val) if isinstance(v, torch.Tensor))


def _peak_activations(gm: fx.GraphModule) -> int:
    """Peak bytes of live intermediate values when the graph runs in order (views share their base)."""
    last_use: dict[fx.Node, int] = {}
    order = list(gm.graph.nodes)
    for i, n in enumerate(order):
        for a in n.all_input_nodes:
            last_use[a] = i
    live = peak = 0
    sizes: dict[fx.Node, int] = {}
    for i, n in enumerate(order):
        if n.op == "call_function":
            val = n.meta.get("val")
            is_view = isinstance(n.target, torch._ops.OpOverload) and n.target.is_view
            sizes[n] = 0 if is_view else _nbytes(val)
            live += sizes[n]
            peak = max(peak, live)
        for a in n.all_input_nodes:
            if last_use.get(a) == i:
                live -= sizes.pop(a, 0)
    return peak


def analyze(model: torch.nn.Module, example_inputs: Any, *, measure: bool = True, config: Config | None = None) -> Analysis:
    """Per-node FLOPs/MACs/bytes/intensity/predicted and measured time/MBU/bound, totals, memory footprint."""
    from costmodel.roofline import node_cost
    from fusion.pipeline import hardware

    config = config or Config()
    example_inputs = check_inputs(model, example_inputs)
    cap = capture_module(model, example_inputs)
    hw = hardware(config)
    gm = cap.gm
    measured: dict[str, float] = {}
    if measure:
        params = dict(model.named_parameters())
        params.update(dict(model.named_buffers()))
        user = iter(pytree.tree_leaves((example_inputs, {})))
        args = [next(user) if k == "user" else (cap.program.constants[n] if k == "constant" else params[n])
                for k, n in cap.input_bindings]
        measured = _measure(gm, args)
    stats = []
    for n in gm.graph.nodes:
        if n.op in _FREE:
            continue
        c = node_cost(n)
        stats.append(NodeStats(n.name, getattr(n.target, "__name__", str(n.target)), c.flops + c.gemm_flops,
                               c.bytes_read, c.bytes_written, c.transcendentals, c.time(hw, hw.aten_overhead),
                               measured.get(n.name)))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    totals = {
        "flops": sum(s.flops for s in stats),
        "bytes": sum(s.bytes for s in stats),
        "predicted_s": sum(s.predicted_s for s in stats),
        "measured_s": sum(s.measured_s for s in stats if s.measured_s) if measured else None,
    }
    return Analysis(stats, weight_bytes, _peak_activations(gm), hw, totals)
