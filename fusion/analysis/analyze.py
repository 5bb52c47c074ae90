"""`fusion.analyze(model, example_inputs)`: FLOPs, bytes, intensity, predicted/measured time and MBU per
node, totals, and memory footprint (weights, peak activations, KV cache) — the numbers an architect
reasons with (seed 004), without optimizing. `fusion.analyze(opt)` analyses an optimized program
(fused kernels + ATen calls) the same way; `before.compare(after)` / `fusion.compare` put the two side
by side (fusion/analysis/compare.py).

Definitions (the same as the cost model's, fusion/costmodel/roofline.py and fusion/costmodel/program_cost.py):
    FLOPs   arithmetic operations, a multiply-add = 2 (a matmul [M,K]x[K,N] = 2*M*N*K, bias add + M*N);
            exp/erf/tanh evaluations are counted apart (transcendentals), not as FLOPs.
    bytes   per ATen call: every distinct element of every tensor operand read once (a broadcast operand
            once, weights too) + every output element written once; views move 0 bytes. Per fused
            kernel: the bytes crossing its boundary (inputs read once, outputs written once).
    time    predicted: the roofline time of the call (max of bytes / bandwidth and compute) + its call
            overhead; measured: median of `repeat` runs of that node alone, the graph run node by node.
    MBU     measured bytes/s over the calibrated copy bandwidth (fusion.costmodel.hardware.mbu, shared with
            bench/run.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fusion import progress
from fusion.analysis import memory
from fusion.capture import capture_module, check_inputs
from fusion.config import Config
from fusion.analysis.comparison import Comparison
from fusion.analysis.plots import roofline_plot
from fusion.analysis.timing import NodeStats, graph_stats
from fusion.errors import FusionInputError

if TYPE_CHECKING:  # annotations only: analyze imports fusion.api when it is called
    from fusion.api import ExampleInputs, OptimizedModule
    from fusion.costmodel.hardware import HardwareProfile

@dataclass
class Analysis:
    nodes: list[NodeStats]
    weight_bytes: int
    peak_activation_bytes: int
    hw: HardwareProfile
    totals: dict[str, Any] = field(default_factory=dict)
    kv_sites: list[memory.KVSite] = field(default_factory=list)  # one per attention site in the graph
    kv_per_token_config: float | None = None              # K+V bytes per (batch, position) from model.config
    batch: int = 1                                         # the example's batch (dim 0 of the first input)
    seq: int | None = None                                 # the example's sequence length
    label: str = "model"
    model: torch.nn.Module | None = field(default=None, repr=False)
    inputs: tuple[Any, ...] | None = field(default=None, repr=False)
    _act_cache: dict[tuple[int, int], int | None] = field(default_factory=dict, repr=False)

    # -- per node ---------------------------------------------------------------------------------
    def bound(self, s: NodeStats) -> str:
        ridge = self.hw.gemm_flops["float32"] / self.hw.copy_bandwidth
        return "compute" if s.intensity >= ridge else "memory"

    def mbu(self, s: NodeStats) -> float | None:
        """Memory-bandwidth utilisation: achieved bytes/s over the machine's measured copy bandwidth."""
        from fusion.costmodel.hardware import mbu

        return mbu(s.bytes, s.measured_s, self.hw.copy_bandwidth)

    @property
    def calls(self) -> list[NodeStats]:
        """The nodes that launch work: ATen calls and fused kernels (not views)."""
        return [s for s in self.nodes if s.kind != "view"]

    def table(self, top: int | None = None) -> str:
        """The heaviest nodes (by measured, else predicted time) and the totals; fits 100 columns."""
        rows = sorted(self.calls, key=lambda s: -(s.measured_s or s.predicted_s))[:top]
        head = (f"{'node':<22} {'op':<16} {'GFLOP':>7} {'MB':>7} {'FLOP/B':>6} {'pred us':>8} {'meas us':>8} "
                f"{'MBU':>4} bound")
        out = [head, "-" * len(head)]
        for s in rows:
            mbu = self.mbu(s)
            meas = f"{s.measured_s * 1e6:>8.1f}" if s.measured_s else f"{'-':>8}"
            out.append(
                f"{s.name[:22]:<22} {s.op[:16]:<16} {s.flops / 1e9:>7.3f} {s.bytes / 1e6:>7.2f} "
                f"{min(s.intensity, 99999):>6.1f} {s.predicted_s * 1e6:>8.1f} {meas} "
                f"{('%.2f' % mbu) if mbu else '-':>4} {self.bound(s)}")
        t = self.totals
        out.append("-" * len(head))
        out.append(
            f"total: {t['flops'] / 1e9:.3f} GFLOP ({t['flops'] / 2e9:.3f} GMAC), {t['bytes'] / 1e6:.1f} MB moved, "
            f"{t['kernels']} calls, predicted {t['predicted_s'] * 1e3:.2f} ms"
            + (f", measured {t['measured_s'] * 1e3:.2f} ms" if t.get("measured_s") else ""))
        out.append(f"memory: weights {self.weight_bytes / 1e6:.1f} MB, peak activations "
                   f"{self.peak_activation_bytes / 1e6:.1f} MB")
        kv = self.kv_bytes_per_token
        if kv:
            out.append(f"KV cache: {kv / 1024:.2f} KiB per token per sequence ({self.kv_source}); "
                       f"4096 tokens: {self.kv_cache_bytes(1, 4096) / 2**20:.1f} MiB")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    # -- memory -----------------------------------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> float | None:
        """K+V bytes kept per (batch element, position): from the graph's attention sites, else from a
        Hugging Face config; None when neither is there."""
        if self.kv_sites:
            return sum((s.k_bytes + s.v_bytes) / (self.batch * max(s.kv_len, 1)) for s in self.kv_sites)
        return self.kv_per_token_config

    @property
    def kv_source(self) -> str:
        if self.kv_sites:
            return f"{len(self.kv_sites)} attention site{'s' if len(self.kv_sites) != 1 else ''} in the graph"
        return "model.config" if self.kv_per_token_config else "none"

    def kv_cache_bytes(self, batch: int, seq: int) -> float:
        """KV-cache bytes of a decoder holding `seq` positions for each of `batch` sequences."""
        per = self.kv_bytes_per_token
        if per is None:
            raise FusionInputError(
                "no KV cache: the graph has no attention site (softmax(q @ k^T) @ v, SDPA, fusion.attention) "
                "and the model has no Hugging Face config (num_hidden_layers, num_attention_heads, ...)")
        return per * batch * seq

    def activation_bytes(self, batch: int, seq: int) -> int | None:
        """Peak activation bytes of one forward at (batch, seq): the analysed graph's at the example's
        shape, else the model captured again on resized inputs (memory.resized_inputs); None if that fails."""
        if (batch, seq) == (self.batch, self.seq):
            return self.peak_activation_bytes
        if self.model is None or self.seq is None:
            return None
        key = (batch, seq)
        if key not in self._act_cache:
            self._act_cache[key] = memory.peak_activations_at(self.model, self.inputs, self.batch, self.seq, batch, seq)
        return self._act_cache[key]

    def memory(self, batch: int, seq: int) -> dict[str, Any]:
        """Bytes: weights, peak activations of one forward, KV cache (0 without attention), and total."""
        act = self.activation_bytes(batch, seq)
        kv = self.kv_cache_bytes(batch, seq) if self.kv_bytes_per_token else 0.0
        return {"batch": batch, "seq": seq, "weights": self.weight_bytes, "activations": act, "kv_cache": kv,
                "total": self.weight_bytes + (act or 0) + kv}

    def memory_plot(self, path: str, batch: int = 1, seqs: Sequence[int] | None = None,
                    title: str | None = None) -> str:
        """Memory vs sequence length at `batch`: weights, peak activations and KV cache, stacked (PNG)."""
        if seqs is None:
            s0 = self.seq or 128
            seqs = sorted({max(1, s0 * 2 ** k // 4) for k in range(6)})
        rows = [self.memory(batch, s) for s in seqs]
        kv = [r["kv_cache"] for r in rows] if self.kv_bytes_per_token else None
        label = f"KV cache ({self.kv_bytes_per_token / 1024:.3g} KiB/token; {self.kv_source})" if kv else ""
        title = title or f"{self.label}: memory vs sequence length, batch {batch}"
        return memory.draw_memory_plot(path, list(seqs), self.weight_bytes, [r["activations"] for r in rows],
                                       kv, title, label)

    # -- comparison and export ----------------------------------------------------------------------
    def compare(self, other: "Analysis") -> Comparison:
        """Before (self) vs after (other): kernels, bytes, FLOPs, predicted and measured time."""
        return Comparison(self, other)

    def to_dict(self) -> dict[str, Any]:
        nodes = [dict(s.__dict__, intensity=s.intensity if s.bytes else None, mbu=self.mbu(s)) for s in self.nodes]
        out = {"label": self.label, "totals": self.totals, "weight_bytes": self.weight_bytes,
               "peak_activation_bytes": self.peak_activation_bytes, "batch": self.batch, "seq": self.seq,
               "kv_cache": {"bytes_per_token": self.kv_bytes_per_token, "source": self.kv_source,
                            "sites": [s.__dict__ for s in self.kv_sites]},
               "hardware": {"name": self.hw.name, "copy_bandwidth": self.hw.copy_bandwidth,
                            "gemm_flops_fp32": self.hw.gemm_flops.get("float32")},
               "nodes": nodes}
        return out

    def roofline_plot(self, path: str, title: str = "roofline") -> str:
        """Each call as a point (arithmetic intensity, achieved or predicted FLOP/s) under the machine's roofs."""
        return roofline_plot(path, self.hw, [(self.label, self.calls, "o")], title)


def _user_shape(inputs: Any) -> tuple[int, int | None]:
    """(batch, sequence) of the example: dims 0 and 1 of the first tensor input (inputs are batch-first)."""
    for t in pytree.tree_leaves(inputs):
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0]), (int(t.shape[1]) if t.dim() >= 2 else None)
    return 1, None


def _weight_names(gm: fx.GraphModule, bindings: Sequence[tuple[str, str]]) -> set[str]:
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {p.name for p, (kind, _) in zip(phs, bindings) if kind != "user"}


def _fill_vals(gm: fx.GraphModule, program_gm: fx.GraphModule | None) -> None:
    """Give placeholders and call_function nodes that lack meta["val"] (a lowered program rebuilt from a cache)
    a value: the same-named node's of the graph before lowering, else (calls) the op run on its inputs' fake
    values. Shapes are
    what the cost model counts with; nothing else is changed."""
    from torch._subclasses.fake_tensor import FakeTensor

    missing = [n for n in gm.graph.nodes if n.op in ("placeholder", "call_function") and "val" not in n.meta]
    if not missing:
        return
    vals = {n.name: n.meta["val"] for n in program_gm.graph.nodes if "val" in n.meta} if program_gm else {}
    for n in missing:
        if n.name in vals:
            n.meta["val"] = vals[n.name]
            continue
        if n.op == "placeholder":
            continue
        ins = [a.meta.get("val") for a in n.all_input_nodes]
        mode = next((v.fake_mode for v in pytree.tree_leaves(ins) if isinstance(v, FakeTensor)), None)
        if mode is None or any(v is None for v in ins):
            continue
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: a.meta["val"])
        try:
            with mode:
                n.meta["val"] = n.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - an op that cannot run on fake values is counted as 0 bytes
            pass


def build(gm: fx.GraphModule, args: Sequence[Any] | None, hw: Any, model: torch.nn.Module, inputs: Any,
          bindings: Sequence[tuple[str, str]], label: str, kernels: dict | None = None,
          program_gm: fx.GraphModule | None = None, repeat: int = 3) -> Analysis:
    """The Analysis of one graph of `model` run on `args` (None: predictions only)."""
    _fill_vals(gm, program_gm)
    stats, totals = graph_stats(gm, args, hw, kernels, program_gm, repeat)
    sites = memory.attention_sites(gm, _weight_names(gm, bindings))
    batch, seq = _user_shape(inputs)
    if sites:  # the sequence is the attention's length when the inputs have it
        lens = [s.kv_len for s in sites]
        kv_len = max(set(lens), key=lens.count)
        dims = {int(d) for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor) for d in t.shape[1:]}
        seq = kv_len if kv_len in dims else seq
    return Analysis(stats, sum(p.numel() * p.element_size() for p in model.parameters()),
                    memory.peak_activation_bytes(gm), hw, totals, sites,
                    memory.kv_bytes_per_token_from_config(model), batch, seq, label, model, inputs)


def analyze(model: torch.nn.Module, example_inputs: ExampleInputs | None = None, *, measure: bool = True,
            config: Config | None = None, repeat: int = 3) -> Analysis:
    """Per-node FLOPs/MACs/bytes/intensity/predicted and measured time/MBU/bound, totals, memory footprint.

    `model` may be a `fusion.optimize` result: then the optimized program is analysed (its fused kernels
    and remaining ATen calls), on `example_inputs` or else the inputs it was optimized with.
    """
    from fusion.api import OptimizedModule
    from fusion.pipeline import hardware

    config = config or Config()
    if isinstance(model, OptimizedModule):
        return _analyze_optimized(model, example_inputs, measure, repeat)
    if example_inputs is None:
        raise FusionInputError("fusion.analyze(model, example_inputs): example inputs are needed to capture the model")
    example_inputs = check_inputs(model, example_inputs)
    progress.stage("capture")
    cap = capture_module(model, example_inputs)
    args = None
    if measure:
        progress.stage("measure: each node alone")
        params = dict(model.named_parameters())
        params.update(dict(model.named_buffers()))
        user = iter(pytree.tree_leaves((example_inputs, {})))
        args = [next(user) if k == "user" else (cap.program.constants[n] if k == "constant" else params[n])
                for k, n in cap.input_bindings]
    return build(cap.gm, args, hardware(config), model, example_inputs, cap.input_bindings,
                 type(model).__name__, repeat=repeat)


def program_inputs(opt: OptimizedModule,
                   example_inputs: ExampleInputs | None = None) -> tuple[tuple[Any, ...], list[Any]]:
    """(user inputs, the flat argument list of the optimized program's graph) of an OptimizedModule."""
    if opt.captured is None or not opt.graphs:
        raise FusionInputError(
            f"only programs captured whole by torch.export can be analysed; this model was captured by "
            f"{opt.capture_method!r}{opt.capture_note}. Analyse the model itself: fusion.analyze(model, inputs)")
    inputs = opt.example_inputs if example_inputs is None else check_inputs(opt.original, example_inputs)
    return inputs, opt.flat_args(*inputs)


def _analyze_optimized(opt: OptimizedModule, example_inputs: ExampleInputs | None, measure: bool,
                       repeat: int) -> Analysis:
    from fusion.pipeline import hardware

    inputs, args = program_inputs(opt, example_inputs)
    g = opt.graphs[0]
    progress.stage("measure: each kernel and ATen call alone" if measure else "cost")
    a = build(g.gm, args if measure else None, hardware(g.config), opt.original, inputs,
              opt.captured.input_bindings, f"{type(opt.original).__name__} (fusion)",
              {k.name: k for k in g.log.kernels}, g.program_gm, repeat)
    a.model = None  # other shapes would be captured from the original model, not this program
    return a
