"""GEMM library choice (fusion/passes/gemm.py): fp32 CPU mm/addmm -> oneDNN's linear when the profile says it
is faster; same results as eager, weights passed as they are (never copied), the rest untouched."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from fusion.extract.pricing import DEFAULT_PROFILE
from fusion.passes.gemm import ONEDNN_KEY, onednn_linear, use_onednn_gemms

from .conftest import rel_err

aten = torch.ops.aten
pytestmark = pytest.mark.skipif(onednn_linear() is None, reason="this torch has no oneDNN")

FAST = dataclasses.replace(DEFAULT_PROFILE, gemm_flops={"float32": 1e11, ONEDNN_KEY: 2.5e11})
SLOW = dataclasses.replace(DEFAULT_PROFILE, gemm_flops={"float32": 1e11, ONEDNN_KEY: 1.05e11})


def graph_of(m, *args):
    from fusion.capture import capture_module
    cap = capture_module(m, args)
    return cap.gm if hasattr(cap, "gm") else cap


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(256, 512), nn.Linear(512, 256, bias=False)
        self.w = nn.Parameter(torch.randn(256, 128) / 16)  # x @ w: a [K, N] operand, not a transposed weight

    def forward(self, x):
        return (self.b(torch.relu(self.a(x))) @ self.w).sum(-1, keepdim=True) + x[..., :1]


def run_pass(m, x, hw):
    gm = graph_of(m, x)
    return gm, use_onednn_gemms(gm, hw)


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_products_move_to_onednn_with_eager_results():
    torch.manual_seed(0)
    m, x = MLP().eval(), torch.randn(4, 16, 256)
    gm, (new, count) = run_pass(m, x, FAST)
    assert count == 3 and new is not gm
    assert aten.mm.default not in targets(new) and aten.addmm.default not in targets(new)
    assert aten.addmm.default in targets(gm) or aten.mm.default in targets(gm)   # the input graph is untouched
    linears = [n for n in new.graph.nodes if n.target is onednn_linear()]
    weights = {n.args[1].name for n in linears}
    assert {"p_a_weight", "p_b_weight"} <= weights                # the parameters themselves, no transposed copy
    assert "linear" in new.code
    args = [dict(m.named_parameters())[n.target.removeprefix("p_").replace("_", ".", 1)] if n.name.startswith("p_")
            else x for n in new.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        assert rel_err(new(*args)[0], m(x)) <= 1e-5


def test_profile_decides():
    m, x = MLP().eval(), torch.randn(4, 16, 256)
    gm, (new, count) = run_pass(m, x, SLOW)
    assert count == 0 and new is gm


@pytest.mark.parametrize("case", ["empty_k", "beta", "bias_2d", "float64"])
def test_what_stays_on_aten(case):
    class M(nn.Module):
        def forward(self, a, b, c):
            if case == "beta":
                return torch.addmm(c, a, b, beta=0.5)
            if case == "bias_2d":
                return torch.addmm(c, a, b)
            return a @ b
    k = 0 if case == "empty_k" else 8
    dt = torch.float64 if case == "float64" else torch.float32
    a, b = torch.randn(5, k, dtype=dt), torch.randn(k, 6, dtype=dt)
    c = torch.randn(5, 6, dtype=dt) if case == "bias_2d" else torch.randn(6, dtype=dt)
    gm = graph_of(M(), a, b, c)
    new, count = use_onednn_gemms(gm, FAST)
    assert count == 0 and new is gm


def test_through_torch_compile_dynamic_and_training():
    """The real profile of this machine decides; whatever it says, results and gradients match eager."""
    torch.manual_seed(0)
    m, ref = MLP(), MLP()
    ref.load_state_dict(m.state_dict())
    torch._dynamo.reset()
    cm = torch.compile(m, backend="fusion", dynamic=True)
    for rows in (3, 17):
        x = torch.randn(2, rows, 256)
        out, out_ref = cm(x), ref(x)
        assert rel_err(out, out_ref) <= 1e-4
        out.square().mean().backward()
        out_ref.square().mean().backward()
        for p, q in zip(m.parameters(), ref.parameters()):
            assert rel_err(p.grad, q.grad) <= 1e-4
            p.grad = q.grad = None


def test_tiny_products_stay_on_aten():
    """oneDNN's fixed cost per call (~12 us here vs ~2 us for ATen's mm) loses on tiny products."""
    m, x = MLP().eval(), torch.randn(1, 1, 256)          # one row: 0.26-0.5 MFLOP per product
    gm, (new, count) = run_pass(m, x, FAST)
    assert count == 0 and new is gm
