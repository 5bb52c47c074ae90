"""What extraction chose at each fusion site, and what else it considered (for `explain()`).

A *site* is an e-class where the chosen program uses a fused op that the input did not have (the
places a rule "fired"). Its alternatives are the other e-nodes of that class (the form as written,
and any other equivalent form the rules found). Each is priced as a whole program: the chosen
program with only that class switched (children it needs and the chosen program lacks are taken
from the input program, else from the greedy program), under the same cost model extraction used.
So "+0.41 ms" next to an alternative reads: the program would be predicted 0.41 ms slower with it.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

from fusion.extract.pricing import LOGICAL
from fusion.extract.ilp import EGraphExport, FusionCosts, dag_cost, extract_greedy, fused_cost
from fusion.rewrite.insert import Inserted
from fusion.rewrite.rebuild import RULE_OF, rule_name

MAX_SITES = 64
MAX_ALTERNATIVES = 4
BUDGET_S = 0.3


def describe(ex: EGraphExport, j: int) -> str:
    """A short name for e-node j: its op and its non-tensor arguments."""
    n = ex.nodes[j]
    lits = [f"{v:g}" if isinstance(v, float) else str(v) for v in n.literals]
    return n.op + (f"[{', '.join(lits)}]" if lits else "")


def site_alternatives(ex: EGraphExport, ins: Inserted, choice: dict[int, int], roots: Sequence[int],
                      costs: Sequence[float], fc: FusionCosts | None, original: dict[int, int],
                      as_written: set[int]) -> list[dict]:
    """One dict per site (at most MAX_SITES, within BUDGET_S seconds):
    {"rule", "node", "chosen": {"form", "cost_s"}, "alternatives": [{"form", "as_written", "cost_s"}]}."""
    t0 = time.perf_counter()
    fallback = {**extract_greedy(ex, roots, costs).choice, **original}

    def price(ch: dict[int, int]) -> float:
        full = {**fallback, **ch}
        return fused_cost(ex, full, roots, costs, fc) if fc is not None else dag_cost(ex, full, roots, costs)

    names: dict[int, str] = {}
    for n in ins.signatures:        # the last original FX node of each class names the site
        names[ex.lets[n.name]] = n.name
    chosen_cost = price(choice)
    sites: list[dict] = []
    for c, j in choice.items():
        node = ex.nodes[j]
        if node.op not in RULE_OF or j in as_written:
            continue
        if len(sites) >= MAX_SITES or time.perf_counter() - t0 > BUDGET_S:
            break
        alts = []
        for k in ex.classes.get(c, []):
            other = ex.nodes[k]
            if k == j or other.op in LOGICAL or other.op in ("var", "scalar", "none") or c in other.children:
                continue
            cost = price({**choice, c: k})
            if cost != float("inf"):
                alts.append({"form": describe(ex, k), "as_written": k in as_written, "cost_s": cost})
        alts.sort(key=lambda a: (not a["as_written"], a["cost_s"]))
        rule = rule_name(node.op, node.literals)
        sites.append({"rule": rule, "node": names.get(c, f"class {c}"),
                      "chosen": {"form": describe(ex, j), "cost_s": chosen_cost},
                      "alternatives": alts[:MAX_ALTERNATIVES]})
    return sites
