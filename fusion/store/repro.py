"""Weight-free reproducers: everything needed to replay an optimization, nothing of the weights.

    fusion.store.repro.dump(opt, "bug.json")      # or: python -m fusion repro dump <workload|pkg.mod:factory> bug.json
    fusion.store.repro.replay("bug.json")         # or: python -m fusion repro replay bug.json

The file holds the captured graph (ops, argument structure, shapes, dtypes, strides), the config, the
rules that fired and the kernels made. Replay rebuilds the graph, fills every placeholder (weights too)
with random values of the recorded shapes, optimizes it again, checks that the same decisions come out,
and compares the optimized program against the graph run op by op in eager ATen.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from fusion.config import Config
from fusion.store.serialize import graph_from_dict, graph_to_dict

FORMAT = "fusion-repro/1"


def _config_dict(config: Config) -> dict:
    return {k: (sorted(v) if isinstance(v, frozenset) else v) for k, v in config.__dict__.items()}


def _decisions(compiled: Any) -> dict:
    return {
        "fired": {rule: len(nodes) for rule, nodes in compiled.log.fired.items()},
        "kernels": [k.name for k in compiled.log.kernels],
    }


def dump(opt: Any, path: str | Path) -> Path:
    """Write the reproducer of every graph of an OptimizedModule (or a CompiledGraph) to `path` (JSON)."""
    graphs = getattr(opt, "graphs", None) or [opt]
    entries = []
    for g in graphs:
        entries.append({"label": g.log.label, "graph": graph_to_dict(g.source_gm), **_decisions(g)})
    config = getattr(opt, "config", None) or graphs[0].config
    data = {"format": FORMAT, "torch": torch.__version__, "config": _config_dict(config), "graphs": entries}
    path = Path(path)
    path.write_text(json.dumps(data, separators=(",", ":")))
    return path


@dataclass
class ReplayResult:
    same_decisions: bool
    max_rel_error: float
    details: list[dict] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"replay: decisions {'identical' if self.same_decisions else 'DIFFER'}, "
                 f"max relative error {self.max_rel_error:.2e}"]
        for d in self.details:
            lines.append(f"  {d['label']}: fired {d['fired']}, {len(d['kernels'])} kernels, rel err {d['rel_error']:.2e}"
                         + ("" if d["same"] else f" (recorded: fired {d['recorded_fired']}, kernels {d['recorded_kernels']})"))
        return "\n".join(lines)


def _random_like(meta: dict, gen: torch.Generator) -> Any:
    if "scalar" in meta:
        return int(meta["scalar"])
    shape = [int(s) for s in meta["shape"]]
    stride = [int(s) for s in meta["stride"]]
    dtype = getattr(torch, meta["dtype"])
    t = torch.empty_strided(shape, stride, dtype=dtype)
    if dtype.is_floating_point:
        # scaled like an initialised layer (std 1/sqrt(fan-in)) so deep graphs stay in range; 1-D tensors
        # (norm weights, biases) near 1
        if len(shape) >= 2:
            t.copy_((torch.randn(shape, generator=gen) / max(shape[-1], 1) ** 0.5).to(dtype))
        else:
            t.copy_((1.0 + 0.1 * torch.randn(shape, generator=gen)).to(dtype))
    elif dtype == torch.bool:
        t.copy_(torch.rand(shape, generator=gen) > 0.5)
    else:
        t.copy_(torch.randint(0, 2, shape, generator=gen))  # indices stay valid for any table size
    return t


def replay(path: str | Path, seed: int = 0) -> ReplayResult:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fusion.pipeline import compile_graph

    data = json.loads(Path(path).read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fusion reproducer (format {data.get('format')!r})")
    cfg = data["config"]
    config = Config(**{k: (frozenset(v) if isinstance(v, list) else v) for k, v in cfg.items()})
    gen = torch.Generator().manual_seed(seed)
    details, worst, same_all = [], 0.0, True
    for entry in data["graphs"]:
        metas = [n["meta"] for n in entry["graph"]["nodes"] if n["op"] == "placeholder"]
        args = [_random_like(m, gen) for m in metas]
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        reference = graph_from_dict(entry["graph"], fakes)
        candidate = graph_from_dict(entry["graph"], fakes)
        compiled = compile_graph(candidate, config, label=entry["label"])
        with torch.no_grad():
            want = fx.Interpreter(reference).run(*args)
            got = compiled(*args)
        err = 0.0
        for a, b in zip(_tensors(got), _tensors(want)):
            if b.is_floating_point() and b.numel():
                err = max(err, ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item())
        dec = _decisions(compiled)
        same = Counter(dec["fired"]) == Counter(entry["fired"]) and dec["kernels"] == entry["kernels"]
        same_all &= same
        worst = max(worst, err)
        details.append({"label": entry["label"], "fired": dec["fired"], "kernels": dec["kernels"], "rel_error": err,
                        "same": same, "recorded_fired": entry["fired"], "recorded_kernels": entry["kernels"]})
    return ReplayResult(same_all, worst, details)


def _tensors(x: Any) -> list[torch.Tensor]:
    import torch.utils._pytree as pytree

    return [t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]
