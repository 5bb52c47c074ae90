"""The e-graph stage: FX graph in, FX graph with fused ops out.

    rewrite(gm, config, hw) =
        insert      FX -> egglog terms (leaves by name, one `let` per modelled node)   fusion/rewrite/insert.py
        saturate    rule families under Config limits                                  fusion/rewrite/saturate.py
        extract     export, roofline cost per e-node, DAG ILP                           fusion/extract/ilp.py
        rebuild     chosen program -> GraphModule (names and meta kept)                 fusion/rewrite/rebuild.py
        sites       per fusion site: the alternatives, each priced as a whole program   fusion/rewrite/sites.py

Extraction is kernel-boundary aware (`fusion.extract.ilp.FusionCosts`): a pointwise chain the
scheduler will fuse is priced as one kernel, not as one call per op. The result is never predicted
slower than the input: if the extracted program does not cost less under that model, the input
graph is returned unchanged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fusion import progress
from fusion.config import Config
from fusion.costmodel.hardware import HardwareProfile
from fusion.dialect.graph_walk import on_cuda
from fusion.extract import TIE_BREAK_S, choose
from fusion.extract.ilp import export_egraph, kernel_outputs
from fusion.rewrite.errors import RewriteError
from fusion.rewrite.insert import insert
from fusion.rewrite.rebuild import original_enodes, rebuild
from fusion.rewrite.rules import FAMILIES
from fusion.rewrite.saturate import saturate
from fusion.rewrite.sites import site_alternatives

#: the e-graph's fused forms, whose presence after saturation the coverage report reads (stats["offered"])
OFFERED = frozenset({"attention", "softmax", "log_softmax", "layer_norm", "rms_norm", "gelu", "silu", "glu"})
#: rules that are FX passes, not e-graph families (also names for `Config.disable_rules`)
FX_RULES = ("shared_matmul", "channels_last")  # fusion/passes/merge.py, fusion/passes/layout.py (run by fusion.pipeline after this stage)

__all__ = ["FAMILIES", "RewriteError", "RewriteResult", "rewrite"]


@dataclass
class RewriteResult:
    gm: torch.fx.GraphModule            # rewritten, fusion dialect, meta["val"] on every node
    fired: dict[str, list[str]]         # rule name -> FX node names (of the ORIGINAL graph) it rewrote
    stats: dict = field(default_factory=dict)


def rewrite(gm: torch.fx.GraphModule, config: Config, hw: HardwareProfile | None = None) -> RewriteResult:
    """Rewrite `gm` with the enabled rule families; see the module docstring for the passes."""
    seconds: dict[str, float] = {}
    stats: dict = {"seconds": seconds, "fx_nodes": len(gm.graph.nodes)}
    t = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t
        now = time.perf_counter()
        seconds[stage] = now - t
        t = now

    try:
        ins = insert(gm)
    except RewriteError:
        raise
    except Exception as e:
        raise RewriteError("insert", f"{type(e).__name__}: {e}") from e
    lap("insert")
    stats.update(modelled=len(ins.signatures), roots=len(ins.roots))
    if not ins.roots:
        stats.update(stop_reason="saturated", iterations=0, cost_before=0.0, cost_after=0.0)
        return RewriteResult(gm, {}, stats)

    unknown = set(config.disable_rules) - set(FAMILIES) - set(FX_RULES)
    if unknown:
        raise RewriteError("saturate", f"unknown rule families in disable_rules: {sorted(unknown)}; "
                                       f"the families are {sorted({*FAMILIES, *FX_RULES})}")
    families = [rs for name, rs in FAMILIES.items() if name not in config.disable_rules]
    progress.stage("rewrite: saturate")
    try:
        sat = saturate(ins.egraph, families, config.max_iterations, config.max_enodes, config.time_limit_s)
    except Exception as e:
        raise RewriteError("saturate", f"{type(e).__name__}: {e}") from e
    lap("saturate")
    stats.update(iterations=sat.iterations, stop_reason=sat.stop_reason, egraph_rows=sat.size)

    progress.stage("rewrite: extract")
    try:
        ex = export_egraph(ins.egraph)
        orig = original_enodes(ex, ins)
        roots = [ex.lets[n.name] for n in ins.roots]
        ch = choose(ex, orig, roots, hw, config, gpu=on_cuda(gm))
    except RewriteError:
        raise
    except Exception as e:
        raise RewriteError("extract", f"{type(e).__name__}: {e}") from e
    lap("extract")
    stats["offered"] = sorted({node.op.rsplit(".", 1)[-1] for node in ex.nodes} & OFFERED)  # fused forms the e-graph held
    stats.update(enodes=ex.num_enodes, eclasses=len(ex.classes), extraction=ch.result.method,
                 cost_before=ch.before, cost_after=min(ch.before, ch.result.cost))
    kept = not ch.result.cost < ch.before - TIE_BREAK_S
    if ch.fusion is not None:
        stats["kernel_outputs"] = kernel_outputs(ex, ch.as_written if kept else ch.result.choice, roots, ch.fusion)
    if kept:
        stats["kept_input"] = True
        return RewriteResult(gm, {}, stats)

    try:
        new_gm, fired = rebuild(gm, ins, ex, ch.result.choice, orig)
    except RewriteError:
        raise
    except Exception as e:
        raise RewriteError("rebuild", f"{type(e).__name__}: {e}") from e
    lap("rebuild")
    if fired:
        order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        sites = site_alternatives(ex, ins, ch.result.choice, roots, ch.costs, ch.fusion, ch.as_written, ch.original)
        stats["sites"] = sorted(sites, key=lambda site: order.get(site["node"], len(order)))
        lap("alternatives")
    return RewriteResult(new_gm, fired, stats)
