"""The transformer rule families of issue #3 beyond the first ones: quick GELU, GLU forms, layout and
cast simplification, scalar algebra, reductions over several trailing dims, weight-side folding.

Each rule: the eager source form captured as the driver captures it (`torch.export(...).run_decompositions()`),
the fused-op count after `rewrite`, numerics against eager on several shapes (size-1 dims, broadcasts),
and a negative test for each side condition. Rules that introduce a fused op are also lowered into
generated C++ kernels (`lower_to_kernels`) and compared with eager there."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import fusion.ops  # noqa: F401
from fusion.config import Config
from fusion.lower import lower_to_kernels
from rewrites import rewrite
from tests.test_rewrites import ONE, Fn, capture, check, counts, rel_err

aten = torch.ops.aten
HAS_GXX = any(os.access(os.path.join(p, "g++"), os.X_OK) for p in os.environ.get("PATH", "").split(os.pathsep))
needs_gxx = pytest.mark.skipif(not HAS_GXX, reason="needs g++")
TOL = 1e-4          # fp32 relative error against eager


def lowered(module: nn.Module, x: torch.Tensor, cache) -> tuple:
    """capture -> rewrite -> generated kernels; (lower result, output, eager reference)."""
    gm, args = capture(module, x)
    r = rewrite(gm, Config())
    low = lower_to_kernels(r.gm, Config(cache_dir=str(cache)))
    with torch.no_grad():
        return r, low, low.gm(*args)[0], module(x)


# ---- quick GELU ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,fn", [
    ("hf", lambda m, x: x * torch.sigmoid(1.702 * x)),
    ("sigmoid_first", lambda m, x: torch.sigmoid(x * 1.702) * x),
    ("exp_form", lambda m, x: x / (1.0 + torch.exp(-1.702 * x))),
])
def test_gelu_quick(name, fn):
    r = check(Fn(fn), [(3, 8), (1, 8), (2, 1, 5)] if name == "hf" else ONE, {"gelu_quick": 1}, tol=TOL)
    assert "gelu_quick" in r.fired and "gelu" not in r.fired


@pytest.mark.parametrize("name,fn", [
    ("inexact_constant", lambda m, x: x * torch.sigmoid(1.7 * x)),
    ("other_tensor", lambda m, x: x * torch.sigmoid(1.702 * (x + 1.0))),
])
def test_gelu_quick_needs_the_constant_and_the_same_x(name, fn):
    check(Fn(fn), ONE, {"gelu_quick": 0}, tol=TOL)


@needs_gxx
def test_gelu_quick_lowers_into_a_kernel(tmp_path):
    class M(nn.Module):   # CLIP MLP shape: fc1 -> quick gelu -> + residual
        def forward(self, x):
            h = x + 0.5
            return h * torch.sigmoid(1.702 * h) + x
    x = torch.randn(4, 64)
    x[0, :3] = torch.tensor([float("inf"), -float("inf"), -100.0])
    r, low, out, ref = lowered(M(), x, tmp_path)
    assert counts(r.gm)["gelu_quick"] == 1
    assert len(low.kernels) == 1, low.gm.code
    assert not any(n.target is torch.ops.fusion.gelu_quick.default for n in low.gm.graph.nodes)
    assert torch.equal(out.isnan(), ref.isnan())
    fin = ref.isfinite()
    assert rel_err(out[fin], ref[fin]) <= 1e-6
