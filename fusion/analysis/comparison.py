"""Before/after: the captured ATen graph run op by op vs the optimized program (fused kernels + ATen calls).

    cmp = fusion.compare(model, example_inputs)      # optimizes, then analyses both programs
    cmp = fusion.compare(opt)                        # an existing fusion.optimize result
    cmp = fusion.analyze(model, x).compare(fusion.analyze(opt))
    print(cmp); cmp.to_dict(); cmp.roofline_plot("before_after.png")

Both sides are counted with the same cost model (fusion/costmodel/program_cost.py) and timed the same way:
each call alone as the graph runs node by node (summed: "measured, sum of calls"), and the whole graph
module end to end (median of `repeat` calls after a warm-up) when `fusion.compare` measured it.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from fusion.analysis.explain import fmt_bytes, fmt_time
from fusion.analysis.plots import roofline_plot


def median_time(fn: Any, args: Sequence[Any], repeat: int, warmup: int = 1) -> float:
    """Median seconds of `repeat` calls of fn(*args) under no_grad, after `warmup` calls."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(*args)
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn(*args)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


@dataclass
class Comparison:
    before: Any        # analyze.Analysis
    after: Any
    end_to_end: dict = field(default_factory=dict)   # "before"/"after" -> median seconds of a whole call

    def summary(self, a: Any, side: str) -> dict:
        t = a.totals
        return {"kernels": t["kernels"], "fused_kernels": t["fused_kernels"], "aten_calls": t["aten_calls"],
                "view_calls": t["view_calls"], "flops": t["flops"], "bytes": t["bytes"],
                "predicted_s": t["predicted_s"], "measured_s": t.get("measured_s"),
                "measured_end_to_end_s": self.end_to_end.get(side)}

    def to_dict(self) -> dict:
        b, a = self.summary(self.before, "before"), self.summary(self.after, "after")
        num = (int, float)
        ratio = {k: (a[k] / b[k] if isinstance(a[k], num) and isinstance(b[k], num) and b[k] else None)
                 for k in ("kernels", "bytes", "flops", "predicted_s", "measured_s", "measured_end_to_end_s")}
        return {"model": self.before.label, "before": b, "after": a, "after_over_before": ratio}

    def table(self) -> str:
        """The comparison as text (80 columns): one row per quantity, before, after and after/before."""
        d = self.to_dict()
        b, a, r = d["before"], d["after"], d["after_over_before"]

        def ratio(k: str) -> str:
            return f"{r[k]:.2f}x" if r.get(k) else "-"

        rows = [
            ("kernels launched", str(b["kernels"]), str(a["kernels"]), ratio("kernels")),
            ("  fused / ATen calls", f"{b['fused_kernels']} / {b['aten_calls']}",
             f"{a['fused_kernels']} / {a['aten_calls']}", ""),
            ("  view calls", str(b["view_calls"]), str(a["view_calls"]), ""),
            ("bytes moved", fmt_bytes(b["bytes"]), fmt_bytes(a["bytes"]), ratio("bytes")),
            ("GFLOP", f"{b['flops'] / 1e9:.3f}", f"{a['flops'] / 1e9:.3f}", ratio("flops")),
            ("predicted", fmt_time(b["predicted_s"]), fmt_time(a["predicted_s"]), ratio("predicted_s")),
            ("measured, sum of calls", fmt_time(b["measured_s"]), fmt_time(a["measured_s"]), ratio("measured_s")),
            ("measured, end to end", fmt_time(b["measured_end_to_end_s"]), fmt_time(a["measured_end_to_end_s"]),
             ratio("measured_end_to_end_s")),
        ]
        head = f"{'':<24} {'before (ATen)':>16} {'after (fusion)':>16} {'after/before':>13}"
        out = [f"{d['model']}: captured ATen graph op by op vs the optimized program", head, "-" * len(head)]
        out += [f"{k:<24} {x:>16} {y:>16} {z:>13}" for k, x, y, z in rows]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    def roofline_plot(self, path: str, title: str | None = None) -> str:
        """Every call before (circles) and after (triangles; fused kernels drawn larger) on one roofline."""
        return roofline_plot(path, self.after.hw, [("before: ATen op by op", self.before.calls, "o"),
                                                  ("after: fusion", self.after.calls, "^")],
                             title or f"{self.before.label}: roofline before and after fusion")
