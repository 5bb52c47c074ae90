"""Equality saturation under the Config limits, one iteration at a time.

egglog's Python API has no node or time limit, and one iteration can overshoot by 10x, so each
iteration is: push, run shape/dtype analysis to a fixpoint, run every enabled family once, run
the analysis again, then measure. If the e-graph grew past `max_enodes` (counted as rows in all
tables: e-nodes plus analysis facts) the iteration is popped, so the best graph within the limit
is kept. Saturated: the run reports no update, or two iterations in a row did not grow the
e-graph (the `updated` flag stays set under back_off scheduling, see EGGLOG_NOTES.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import reduce

from egglog import EGraph, Ruleset

from fusion.rewrite.rules import analysis


@dataclass
class Saturation:
    iterations: int
    stop_reason: str            # "saturated" | "iteration limit" | "node limit" | "time limit"
    size: int                   # rows in all tables (e-nodes + analysis facts)
    seconds: float


def egraph_size(eg: EGraph) -> int:
    return sum(n for _, n in eg.all_function_sizes())


def saturate(eg: EGraph, families: list[Ruleset], max_iterations: int, max_enodes: int, time_limit_s: float) -> Saturation:
    t0 = time.perf_counter()
    eg.run(analysis.saturate())
    size = egraph_size(eg)
    if not families:
        return Saturation(0, "saturated", size, time.perf_counter() - t0)
    rules = reduce(lambda a, b: a | b, families)
    reason, done, still = "iteration limit", 0, False
    for _ in range(max_iterations):
        if time.perf_counter() - t0 > time_limit_s:
            reason = "time limit"
            break
        eg.push()
        report = eg.run(rules)
        eg.run(analysis.saturate())
        new_size = egraph_size(eg)
        if new_size > max_enodes:
            eg.pop()
            reason = "node limit"
            break
        done += 1
        # no rule changed anything; or (should the flag stay set, as with back_off) two
        # iterations without growth -- an iteration of unions alone can enable new matches
        unchanged = new_size == size
        if not report.updated or (unchanged and still):
            reason = "saturated"
            break
        still, size = unchanged, new_size
    return Saturation(done, reason, egraph_size(eg), time.perf_counter() - t0)
