"""`fusion.compare(model, example_inputs)`: optimize, then analyse the captured ATen graph and the optimized
program the same way (the result, `Comparison`, and how both sides are counted and timed: comparison.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fusion import progress
from fusion.analysis.analyze import analyze, build, program_inputs
from fusion.analysis.comparison import Comparison, median_time
from fusion.config import Config

if TYPE_CHECKING:  # annotations only: compare imports fusion.api when it is called
    from fusion.api import ExampleInputs


def compare(model: torch.nn.Module, example_inputs: ExampleInputs | None = None, config: Config | None = None, *,
            measure: bool = True, repeat: int = 3, end_to_end_repeat: int = 10) -> Comparison:
    """Optimize `model` (or take a `fusion.optimize` result) and compare the captured ATen graph, run op by
    op, with the optimized program: kernels, bytes, FLOPs, predicted and measured time."""
    from fusion.api import OptimizedModule, optimize

    opt = model if isinstance(model, OptimizedModule) else optimize(model, example_inputs, config)
    inputs, args = program_inputs(opt, example_inputs)
    g = opt.graphs[0]
    after = analyze(opt, inputs, measure=measure, repeat=repeat)
    progress.stage("measure: the captured graph, each ATen call alone")
    before = build(g.source_gm, args if measure else None, after.hw, opt.original, inputs,
                   opt.captured.input_bindings, type(opt.original).__name__, repeat=repeat)
    e2e = {}
    if measure:
        progress.stage("measure: both programs end to end")
        e2e = {"before": median_time(g.source_gm, args, end_to_end_repeat),
               "after": median_time(g.gm, args, end_to_end_repeat)}
    return Comparison(before, after, e2e)
