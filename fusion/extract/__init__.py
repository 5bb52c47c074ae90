"""Extraction: from a saturated e-graph, the program the cost model predicts fastest.

    ch = choose(ex, orig, roots, hw, config)   # Choice: result (ILP), costs, the input as a choice, its cost

Each e-node is priced by the roofline of its op (`pricing`: ATen call or fused-kernel member), and the
choice is DAG-aware and kernel-boundary aware (`ilp`: a pointwise chain the scheduler fuses is priced as
one kernel, not one call per op). The input program is priced the same way, so the caller can keep it
when nothing extracted is predicted faster.
"""
from __future__ import annotations

from dataclasses import dataclass

from fusion.config import Config
from fusion.costmodel.hardware import HardwareProfile
from fusion.extract.ilp import EGraphExport, ENode, Extraction, FusionCosts, extract, fused_cost
from fusion.extract.pricing import (FUSIBLE_DTYPES_CPU, FUSIBLE_DTYPES_GPU, boundary_seconds, enode_cost, enode_role,
                                    enode_seconds, inside_cost, row_compatible)

#: added to the cost of every e-node that is not in the input, so ties keep the input's form
TIE_BREAK_S = 1e-12


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
    """The kernel-boundary view of every e-node and e-class (see fusion/extract/ilp.py)."""
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


@dataclass
class Choice:
    """What extraction chose, with what the alternatives were priced at."""

    result: Extraction             # the extracted program (choice per e-class) and its cost
    before: float                  # the input program's predicted cost, priced the same way
    costs: list[float]             # seconds per e-node (ATen-call view)
    fusion: FusionCosts | None     # the kernel-boundary view (None: codegen="aten")
    as_written: dict[int, int]     # the input program as a choice
    original: set[int]             # the input's own e-nodes


def choose(ex: EGraphExport, orig: dict, roots: list[int], hw: HardwareProfile | None, config: Config,
           gpu: bool = False) -> Choice:
    """Price every e-node, price the input program, and extract the cheapest program under the limits of
    `config` (extract_time_limit_s). Ties keep the input's form (TIE_BREAK_S)."""
    original = set(orig.values())
    as_written = original_choice(ex, orig)

    def tie_break(cs: list[float]) -> list[float]:
        return [c if j in original or c == 0.0 else c + TIE_BREAK_S for j, c in enumerate(cs)]

    costs = tie_break(node_costs(ex, hw))
    # generated kernels: kernel-boundary-aware extraction; ATen only (codegen="aten"): each e-node a call
    fc = fusion_costs(ex, hw, gpu=gpu) if config.codegen != "aten" else None
    before = sum(costs[j] for j in original)
    if fc is not None:
        fc.inside = tie_break(fc.inside)
        priced = fused_cost(ex, as_written, roots, costs, fc)
        if priced < float("inf"):        # else the input is not a choice of this e-graph
            before = priced + sum(costs[j] for j in _dropped_noops(ex, orig, as_written))
    result = extract(ex, roots, lambda n: costs[n.id], config.extract_time_limit_s, fusion=fc)
    return Choice(result, before, costs, fc, as_written, original)
