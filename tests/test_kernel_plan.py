"""The kernel IR's LoopPlan (fusion.lower.kernel_ir.plan_loops): loops (phases), row values and scratch rows,
computed once when the IR is built and printed by both renderers. Needs no compiler: only the IR is built."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fusion.dialect.ops  # noqa: F401  (registers torch.ops.fusion.*)
from fusion.capture import normalize
from fusion.lower import plan_kernels
from fusion.lower.kernel_ir import reach
from .conftest import aten_graph


def one_ir(f, args):
    """The kernel IR of the single kernel lowering makes of f."""
    gm = normalize(aten_graph(f, args))
    (ir,) = plan_kernels(gm).irs
    return ir


def ops(ir, ids) -> list[str]:
    return [ir.prims[i].op for i in ids]


def test_softmax_plan_three_loops_exp_in_scratch():
    ir = one_ir(lambda x: torch.softmax(x, -1), (torch.randn(64, 300),))
    plan = ir.plan
    assert [ops(ir, lp.reductions) for lp in plan.loops] == [["amax"], ["sum"], []]
    assert [lp.outputs for lp in plan.loops] == [(), (), (0,)]
    assert plan.vec_outputs == (0,) and plan.row_outputs == ()
    # exp(x - max) is needed by the sum loop and the output loop: stored once by the first, read by the second
    assert ops(ir, plan.scratch) == ["exp"] and plan.n_scratch == 1
    (e,) = plan.scratch
    assert plan.loops[1].writes == (e,) and plan.loops[2].reads == (e,) and plan.slot(e) == 0
    assert ops(ir, plan.loops[1].body) == ["load", "sub", "exp"]
    assert ops(ir, plan.loops[2].body) == ["exp", "mul"]
    # recomputing every value (the Triton loops), the output loop evaluates the whole chain again
    assert ops(ir, plan.loops[2].needs) == ["load", "sub", "exp", "mul"]
    assert ops(ir, plan.loops[2].rows) == ["recip"] and plan.rows_after == ()


def test_layer_norm_plan_centred_value_in_scratch():
    w, b = torch.randn(300), torch.randn(300)
    ir = one_ir(lambda x, w, b: F.layer_norm(x, (300,), w, b, 1e-5), (torch.randn(64, 300), w, b))
    plan = ir.plan
    assert [ops(ir, lp.reductions) for lp in plan.loops] == [["sum"], ["sum"], []]
    assert [lp.outputs for lp in plan.loops] == [(), (), (0,)]
    # row values between the loops: 1/N first, the mean after the first sum, rsqrt(var + eps) after the second
    assert [ops(ir, lp.rows) for lp in plan.loops] == [["N", "recip"], ["mul"], ["mul", "add", "rsqrt"]]
    # x - mean feeds the variance loop and the output loop: kept in one scratch row
    assert ops(ir, plan.scratch) == ["sub"] and plan.n_scratch == 1
    (d,) = plan.scratch
    assert plan.loops[1].writes == (d,) and plan.loops[2].reads == (d,)
    assert ops(ir, plan.loops[2].body) == ["sub", "mul", "load", "mul", "load", "add"]
    assert set(plan.needed) == set(range(len(ir.prims)))


def test_reach_stops_at_reductions_unless_through():
    ir = one_ir(lambda x: torch.softmax(x, -1), (torch.randn(8, 40),))
    (total,) = [i for i, p in enumerate(ir.prims) if p.op == "sum"]
    assert reach(ir.prims, [total]) == {total}          # a loop reads the sum's row value
    assert ops(ir, sorted(reach(ir.prims, [total], through=True))) == ["load", "amax", "sub", "exp", "sum"]
    (e,) = ir.plan.scratch                              # a scratch value is read back, not recomputed
    out = ir.outputs[0].prim
    assert ops(ir, sorted(reach(ir.prims, [out], frozenset({e})))) == ["exp", "sum", "recip", "mul"]
