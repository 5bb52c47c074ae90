"""The e-graph stage: FX graph in, FX graph with fused ops out.

    rewrite(gm, config, hw) =
        insert      FX -> egglog terms (leaves by name, one `let` per modelled node)   rewrites/insert.py
        saturate    rule families under Config limits                                  rewrites/saturate.py
        extract     export, roofline cost per e-node, DAG ILP                           costmodel/extract.py
        rebuild     chosen program -> GraphModule (names and meta kept)                 rewrites/rebuild.py
        sites       per fusion site: the alternatives, each priced as a whole program   rewrites/sites.py

Extraction is kernel-boundary aware (`costmodel.extract.FusionCosts`): a pointwise chain the
scheduler will fuse is priced as one kernel, not as one call per op. The result is never predicted
slower than the input: if the extracted program does not cost less under that model, the input
graph is returned unchanged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from costmodel.egraph_cost import (
    FUSIBLE_DTYPES_CPU,
    FUSIBLE_DTYPES_GPU,
    boundary_seconds,
    enode_cost,
    enode_role,
    enode_seconds,
    inside_cost,
    row_compatible,
)
from costmodel.extract import EGraphExport, ENode, FusionCosts, export_egraph, extract, fused_cost, kernel_outputs
from costmodel.hardware import HardwareProfile
from fusion import progress
from fusion.config import Config
from rewrites.errors import RewriteError
from rewrites.insert import insert
from rewrites.rebuild import original_enodes, rebuild
from rewrites.rules import FAMILIES
from rewrites.saturate import saturate
from rewrites.sites import site_alternatives

#: rules that are FX passes, not e-graph families (also names for `Config.disable_rules`)
FX_RULES = ("shared_matmul",)     # rewrites/shared_matmul.py (run by fusion.pipeline after this stage)

#: added to the cost of every e-node that is not in the input, so ties keep the input's form
TIE_BREAK_S = 1e-12

__all__ = ["FAMILIES", "RewriteError", "RewriteResult", "rewrite"]


@dataclass
class RewriteResult:
    gm: torch.fx.GraphModule            # rewritten, fusion dialect, meta["val"] on every node
    fired: dict[str, list[str]]         # rule name -> FX node names (of the ORIGINAL graph) it rewrote
    stats: dict = field(default_factory=dict)


def _child_shapes(ex: EGraphExport, n: ENode) -> list:
    """Shapes of e-node n's tensor children (None for a Python scalar or an absent operand)."""
    return [ex.shape(ch) if ex.nodes[ex.classes[ch][0]].op not in ("scalar", "none") else None for ch in n.children]


#: extraction takes one attention call unless its decomposition is predicted this much faster: the call
#: never materialises its [.., S, L] scores (memory stays linear in L), is fast on every path (SDPA, the
#: Triton kernel), and where the two are this close (tiny heads: a few us either way, within the
#: prediction's error) the measured difference is noise (+-5 % at 2x4 heads x 12 tokens)
ATTENTION_HEDGE = 0.8


def node_costs(ex: EGraphExport, hw: HardwareProfile | None) -> list[float]:
    """Predicted seconds of each e-node, from the e-graph's own shape/dtype tables (attention's hedged)."""
    return [enode_seconds(enode_cost(n.op, n.literals, _child_shapes(ex, n), ex.shape(n.cls), ex.dtype(n.cls)), hw)
            * (ATTENTION_HEDGE if n.op == "attention" else 1.0) for n in ex.nodes]


def _on_gpu(gm: torch.fx.GraphModule) -> bool:
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    return any(isinstance(v, torch.Tensor) and v.device.type == "cuda" for v in vals)


def original_choice(ex: EGraphExport, orig: dict) -> dict[int, int]:
    """The input program as an extraction choice: its own e-nodes, leaves for the leaf classes."""
    choice: dict[int, int] = {}
    for j in orig.values():     # a no-op view merged with its input is a self-loop: the input's e-node stands
        n = ex.nodes[j]
        if n.cls not in n.children or n.cls not in choice:
            choice[n.cls] = j
    for n in ex.nodes:
        if n.op in ("var", "scalar", "none"):
            choice.setdefault(n.cls, n.id)
    # a chain of no-ops merged with a leaf (permute(permute(x)) = x, x*1 = x) is a cycle: the leaf stands
    for c in _cyclic_classes(ex, choice):
        leaf = next((m for m in ex.classes[c] if ex.nodes[m].op in ("var", "scalar", "none")), None)
        if leaf is not None:
            choice[c] = leaf
    return choice


def _cyclic_classes(ex: EGraphExport, choice: dict[int, int]) -> set[int]:
    """Classes on a cycle of `choice` (iterative DFS; a back edge closes the cycle on the path)."""
    state: dict[int, int] = {}          # 1: on the path, 2: done
    on_cycle: set[int] = set()
    for start in choice:
        if start in state:
            continue
        path: list[int] = []
        stack: list[tuple[int, bool]] = [(start, False)]
        while stack:
            c, leaving = stack.pop()
            if leaving:
                state[c] = 2
                path.pop()
                continue
            if state.get(c) == 2:
                continue
            state[c] = 1
            path.append(c)
            stack.append((c, True))
            for ch in ex.nodes[choice[c]].children if c in choice else ():
                if state.get(ch) == 1:
                    on_cycle.update(path[path.index(ch):])
                elif ch not in state:
                    stack.append((ch, False))
    return on_cycle


def _dropped_noops(ex: EGraphExport, orig: dict, as_written: dict[int, int]) -> list[int]:
    """Input e-nodes the as-written choice leaves out because a rule proved them no-ops (merged into
    their own input's class, or into a leaf's): the input program still runs them."""
    out = []
    for j in orig.values():
        n = ex.nodes[j]
        chosen = as_written.get(n.cls)
        if chosen != j and (n.cls in n.children or ex.nodes[chosen].op in ("var", "scalar", "none")):
            out.append(j)
    return out


def fusion_costs(ex: EGraphExport, hw: HardwareProfile | None, gpu: bool = False) -> FusionCosts:
    """The kernel-boundary view of every e-node and e-class (see costmodel/extract.py)."""
    dtypes = FUSIBLE_DTYPES_GPU if gpu else FUSIBLE_DTYPES_CPU
    role, inside = [], []
    for n in ex.nodes:
        kids = _child_shapes(ex, n)
        out, dt = ex.shape(n.cls), ex.dtype(n.cls)
        role.append(enode_role(n.op, n.literals, kids, out, dt, dtypes))
        inside.append(inside_cost(n.op, n.literals, kids, out, dt, hw) if role[-1] == "fusible" else 0.0)
    write = {c: boundary_seconds(ex.shape(c), ex.dtype(c), hw, write=True) for c in ex.classes}
    read = {c: boundary_seconds(ex.shape(c), ex.dtype(c), hw, write=False) for c in ex.classes}

    def fuses(j: int, ch: int) -> bool:
        n = ex.nodes[j]
        return row_compatible(n.op, ex.shape(n.cls), ex.shape(ch))
    return FusionCosts(role, inside, write, read, fuses)


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
        original = set(orig.values())
        as_written = original_choice(ex, orig)

        def tie_break(cs: list[float]) -> list[float]:
            return [c if j in original or c == 0.0 else c + TIE_BREAK_S for j, c in enumerate(cs)]

        costs = tie_break(node_costs(ex, hw))
        roots = [ex.lets[n.name] for n in ins.roots]
        # generated kernels: kernel-boundary-aware extraction; ATen only (codegen="aten"): each e-node a call
        fc = fusion_costs(ex, hw, gpu=_on_gpu(gm)) if config.codegen != "aten" else None
        before = sum(costs[j] for j in original)
        if fc is not None:
            fc.inside = tie_break(fc.inside)
            priced = fused_cost(ex, as_written, roots, costs, fc)
            if priced < float("inf"):        # else the input is not a choice of this e-graph
                before = priced + sum(costs[j] for j in _dropped_noops(ex, orig, as_written))
        result = extract(ex, roots, lambda n: costs[n.id], config.extract_time_limit_s, fusion=fc)
    except RewriteError:
        raise
    except Exception as e:
        raise RewriteError("extract", f"{type(e).__name__}: {e}") from e
    lap("extract")
    stats.update(enodes=ex.num_enodes, eclasses=len(ex.classes), extraction=result.method,
                 cost_before=before, cost_after=min(before, result.cost))
    kept = not result.cost < before - TIE_BREAK_S
    if fc is not None:
        stats["kernel_outputs"] = kernel_outputs(ex, as_written if kept else result.choice, roots, fc)
    if kept:
        stats["kept_input"] = True
        return RewriteResult(gm, {}, stats)

    try:
        new_gm, fired = rebuild(gm, ins, ex, result.choice, orig)
    except RewriteError:
        raise
    except Exception as e:
        raise RewriteError("rebuild", f"{type(e).__name__}: {e}") from e
    lap("rebuild")
    if fired:
        order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        sites = site_alternatives(ex, ins, result.choice, roots, costs, fc, as_written, original)
        stats["sites"] = sorted(sites, key=lambda site: order.get(site["node"], len(order)))
        lap("alternatives")
    return RewriteResult(new_gm, fired, stats)
