"""The e-graph stage: FX graph in, FX graph with fused ops out.

    rewrite(gm, config, hw) =
        insert      FX -> egglog terms (leaves by name, one `let` per modelled node)   rewrites/insert.py
        saturate    rule families under Config limits                                  rewrites/saturate.py
        extract     export, roofline cost per e-node, DAG ILP                           costmodel/extract.py
        rebuild     chosen program -> GraphModule (names and meta kept)                 rewrites/rebuild.py

The result is never predicted slower than the input: if the extracted program does not cost less
(by `costmodel.egraph_cost`), the input graph is returned unchanged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from costmodel.egraph_cost import enode_cost, enode_seconds
from costmodel.extract import EGraphExport, ENode, export_egraph, extract
from costmodel.hardware import HardwareProfile
from fusion.config import Config
from rewrites.errors import RewriteError
from rewrites.insert import insert
from rewrites.rebuild import original_enodes, rebuild
from rewrites.rules import FAMILIES
from rewrites.saturate import saturate

#: added to the cost of every e-node that is not in the input, so ties keep the input's form
TIE_BREAK_S = 1e-12

__all__ = ["FAMILIES", "RewriteError", "RewriteResult", "rewrite"]


@dataclass
class RewriteResult:
    gm: torch.fx.GraphModule            # rewritten, fusion dialect, meta["val"] on every node
    fired: dict[str, list[str]]         # rule name -> FX node names (of the ORIGINAL graph) it rewrote
    stats: dict = field(default_factory=dict)


def node_costs(ex: EGraphExport, hw: HardwareProfile | None) -> list[float]:
    """Predicted seconds of each e-node, from the e-graph's own shape/dtype tables."""
    def one(n: ENode) -> float:
        children = [ex.shape(ch) if ex.nodes[ex.classes[ch][0]].op not in ("scalar", "none") else None
                    for ch in n.children]
        return enode_seconds(enode_cost(n.op, n.literals, children, ex.shape(n.cls), ex.dtype(n.cls)), hw)
    return [one(n) for n in ex.nodes]


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

    unknown = set(config.disable_rules) - set(FAMILIES)
    if unknown:
        raise RewriteError("saturate", f"unknown rule families in disable_rules: {sorted(unknown)}; "
                                       f"the families are {sorted(FAMILIES)}")
    families = [rs for name, rs in FAMILIES.items() if name not in config.disable_rules]
    try:
        sat = saturate(ins.egraph, families, config.max_iterations, config.max_enodes, config.time_limit_s)
    except Exception as e:
        raise RewriteError("saturate", f"{type(e).__name__}: {e}") from e
    lap("saturate")
    stats.update(iterations=sat.iterations, stop_reason=sat.stop_reason, egraph_rows=sat.size)

    try:
        ex = export_egraph(ins.egraph)
        orig = original_enodes(ex, ins)
        costs = node_costs(ex, hw)
        original = set(orig.values())
        costs = [c if j in original or c == 0.0 else c + TIE_BREAK_S for j, c in enumerate(costs)]
        roots = [ex.lets[n.name] for n in ins.roots]
        before = sum(costs[j] for j in original)
        result = extract(ex, roots, lambda n: costs[n.id], config.extract_time_limit_s)
    except RewriteError:
        raise
    except Exception as e:
        raise RewriteError("extract", f"{type(e).__name__}: {e}") from e
    lap("extract")
    stats.update(enodes=ex.num_enodes, eclasses=len(ex.classes), extraction=result.method,
                 cost_before=before, cost_after=min(before, result.cost))
    if not result.cost < before - TIE_BREAK_S:
        stats["kept_input"] = True
        return RewriteResult(gm, {}, stats)

    try:
        new_gm, fired = rebuild(gm, ins, ex, result.choice, orig)
    except RewriteError:
        raise
    except Exception as e:
        raise RewriteError("rebuild", f"{type(e).__name__}: {e}") from e
    lap("rebuild")
    return RewriteResult(new_gm, fired, stats)
