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
import torch.nn.functional as F
from torch import nn

import fusion.dialect.ops  # noqa: F401
from fusion.config import Config
from fusion.pipeline import lower_to_kernels
from fusion.rewrite import rewrite
from tests.test_rewrites import FUSED, ONE, Fn, capture, check, counts, rel_err

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


# ---- GLU: silu(g) * u, gelu(g) * u -------------------------------------------------------------------


class Glu(nn.Module):
    """act(x @ wg) * (x @ wu) (LLaMA's MLP without the down projection); `u_shape` replaces the up
    projection by a broadcast weight of that shape, `gate_first` orders the product."""
    def __init__(self, act, d=8, u_shape=None, gate_first=True):
        super().__init__()
        self.act, self.gate_first = act, gate_first
        self.wg = nn.Parameter(torch.randn(d, d) / 3)
        self.wu = nn.Parameter(torch.randn(d, d) / 3) if u_shape is None else None
        self.u = nn.Parameter(torch.randn(u_shape)) if u_shape is not None else None

    def forward(self, x):
        a = self.act(x @ self.wg)
        u = x @ self.wu if self.u is None else self.u
        return a * u if self.gate_first else u * a


SILU = lambda g: torch.nn.functional.silu(g)                             # noqa: E731
SILU_WRITTEN = lambda g: g * torch.sigmoid(g)                            # noqa: E731
GELU = lambda g: torch.nn.functional.gelu(g)                             # noqa: E731
GELU_TANH = lambda g: torch.nn.functional.gelu(g, approximate="tanh")    # noqa: E731


@pytest.mark.parametrize("name,act,key,approx,gate_first", [
    ("swiglu", SILU, "swiglu", None, True),
    ("swiglu_up_first", SILU, "swiglu", None, False),
    ("swiglu_written", SILU_WRITTEN, "swiglu", None, True),
    ("geglu", GELU, "geglu", "none", True),
    ("geglu_tanh", GELU_TANH, "geglu_tanh", "tanh", False),
])
def test_glu(name, act, key, approx, gate_first):
    op = "swiglu" if key == "swiglu" else "geglu"
    shapes = [(3, 8), (1, 8), (2, 1, 8)] if name in ("swiglu", "geglu") else ONE
    r = check(Glu(act, gate_first=gate_first), shapes, {op: 1, "silu": 0, "gelu": 0}, tol=TOL)
    assert set(r.fired) == {key}, r.fired
    n = next(n for n in r.gm.graph.nodes if n.target is FUSED[op])
    if approx is not None:
        assert n.args[2] == approx


def test_glu_with_a_broadcast_up_operand():
    """u [8] broadcasts to g [.., 8]: the product keeps g's shape, so it is a GLU."""
    check(Glu(SILU, u_shape=(8,)), [(3, 8), (2, 1, 8)], {"swiglu": 1}, tol=TOL)


def test_glu_that_would_grow_g_or_scales_by_a_number_is_not_fused():
    class Grow(nn.Module):          # g [8] broadcast against u [.., 8]: the result is not g's shape
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.randn(8))
        def forward(self, x):
            return torch.nn.functional.silu(self.g * 1.0) * x
    check(Grow(), [(3, 8)], {"swiglu": 0}, tol=TOL)
    check(Fn(lambda m, x: torch.nn.functional.silu(x) * 3.0), ONE, {"swiglu": 0, "silu": 1}, tol=TOL)


@needs_gxx
@pytest.mark.parametrize("act", [SILU, GELU_TANH])
def test_glu_kernels_are_no_worse(act, tmp_path):
    """The GLU op lowers into the kernel the scheduler built for act + mul: same count, same bytes."""
    torch.manual_seed(0)
    m = Glu(act, d=64)
    x = torch.randn(2, 16, 64)
    gm, args = capture(m, x)
    with_glu = rewrite(gm, Config())
    without = rewrite(gm, Config(disable_rules=frozenset({"glu"})))
    assert counts(with_glu.gm)["swiglu" if act is SILU else "geglu"] == 1
    lows = [lower_to_kernels(r.gm, Config(cache_dir=str(tmp_path))) for r in (with_glu, without)]
    traffic = [(len(lo.kernels), sum(k.bytes_read + k.bytes_written for k in lo.kernels)) for lo in lows]
    assert traffic[0][0] <= traffic[1][0] and traffic[0][1] <= traffic[1][1], traffic
    assert not any(n.target in (torch.ops.fusion.swiglu.default, torch.ops.fusion.geglu.default)
                   for n in lows[0].gm.graph.nodes), lows[0].gm.code
    with torch.no_grad():
        ref = m(x)
        assert rel_err(lows[0].gm(*args)[0], ref) <= 1e-5


# ---- layout: compositions of views, identity views, no-op copies -----------------------------------


def ops_of(gm: torch.fx.GraphModule, *targets) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


PERMUTE, VIEW, CLONE, EXPAND = aten.permute.default, aten.view.default, aten.clone.default, aten.expand.default


@pytest.mark.parametrize("name,fn,left", [
    # two permutes -> one (rank 3; rank 4 with a size-1 dim), and back to x
    ("permute_permute", lambda m, x: torch.exp(x.permute(2, 0, 1).permute(0, 2, 1)), {PERMUTE: 1}),
    ("permute_back", lambda m, x: torch.exp(x.permute(2, 0, 1).permute(1, 2, 0)), {PERMUTE: 0}),
    ("view_view", lambda m, x: torch.exp(x.view(-1, x.shape[-1]).view(-1)), {VIEW: 1}),
    ("unsqueeze_view_back", lambda m, x: torch.exp(x.unsqueeze(1).view(x.shape)), {VIEW: 0, aten.unsqueeze.default: 0}),
    ("unsqueeze_squeeze", lambda m, x: torch.exp(x.unsqueeze(1).squeeze(1)), {aten.squeeze.dims: 0, aten.unsqueeze.default: 0}),
    ("expand_expand", lambda m, x: torch.exp(x[:1].expand(3, -1, -1).expand(2, -1, -1, -1)), {EXPAND: 1}),
    ("clone_of_contiguous", lambda m, x: torch.exp(torch.exp(x).clone()), {CLONE: 0}),
])
def test_layout_simplification(name, fn, left):
    for shape in ([(2, 3, 5), (1, 3, 1)] if name == "permute_permute" else [(2, 3, 5)]):
        x = torch.randn(shape)
        gm, args = capture(Fn(fn), x)
        r = rewrite(gm, Config())
        for target, n in left.items():
            assert ops_of(r.gm, target) == n, (target, gm.code, r.gm.code)
            assert ops_of(gm, target) > n                     # the source had more of them
        with torch.no_grad():
            assert torch.equal(r.gm(*args)[0], Fn(fn)(x))


def test_layout_rules_keep_real_copies_and_real_permutes():
    """clone of a transposed tensor is a real copy (a later view needs it); a permute that is not the
    identity stays; a view to another shape stays."""
    f = lambda m, x: torch.exp(x.transpose(0, 1).contiguous().view(-1)) + x.permute(1, 0, 2).sum()   # noqa: E731
    x = torch.randn(2, 3, 4)
    gm, args = capture(Fn(f), x)
    r = rewrite(gm, Config(disable_rules=frozenset()))
    assert ops_of(r.gm, CLONE) == 1 and ops_of(r.gm, PERMUTE) == ops_of(gm, PERMUTE)
    with torch.no_grad():
        assert torch.equal(r.gm(*args)[0], Fn(f)(x))


# ---- scalar algebra: negation, powers ---------------------------------------------------------------


@pytest.mark.parametrize("name,fn,expect", [
    ("times_minus_one_is_neg", lambda m, x: x / (1 + torch.exp(x * -1.0)), {"silu": 1}),        # x*-1 -> -x
    ("pow_half_is_sqrt", lambda m, x: x / (x.pow(2).mean(-1, keepdim=True) + 1e-6) ** 0.5, {"rms_norm": 1}),
    ("pow_minus_half_is_rsqrt", lambda m, x: x * (x.pow(2).mean(-1, keepdim=True) + 1e-6) ** -0.5, {"rms_norm": 1}),
    ("plus_neg_is_minus", lambda m, x: (x + (-x.mean(-1, keepdim=True)))
        * torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-5), {"layer_norm": 1}),
    ("pow_quarter_is_not_sqrt", lambda m, x: x / (x.pow(2).mean(-1, keepdim=True) + 1e-6) ** 0.25, {"rms_norm": 0}),
])
def test_scalar_algebra_enables_fusions(name, fn, expect):
    check(Fn(fn), [(3, 8), (2, 1, 8)] if name == "pow_half_is_sqrt" else ONE, expect, tol=TOL)


@pytest.mark.parametrize("name,fn,gone", [
    ("neg_neg", lambda m, x: torch.exp(-(-x)), aten.neg.default),
    ("minus_neg", lambda m, x: torch.exp(x - (-torch.sin(x))), aten.neg.default),
    ("pow_one", lambda m, x: torch.exp(x ** 1.0), aten.pow.Tensor_Scalar),
])
def test_scalar_algebra_drops_ops(name, fn, gone):
    x = torch.randn(3, 8)
    gm, args = capture(Fn(fn), x)
    r = rewrite(gm, Config(codegen="aten"))
    assert ops_of(gm, gone) >= 1 and ops_of(r.gm, gone) == 0, r.gm.code
    with torch.no_grad():
        assert rel_err(r.gm(*args)[0], Fn(fn)(x)) <= 1e-6


# ---- casts -------------------------------------------------------------------------------------------


CASTS = (aten._to_copy.default, torch.ops.prims.convert_element_type.default)


@pytest.mark.parametrize("src,mid,dst,left", [
    (torch.bfloat16, torch.float32, torch.bfloat16, 0),     # bf16 -> f32 -> bf16 = identity
    (torch.float16, torch.float32, torch.bfloat16, 1),      # f16 -> f32 -> bf16 = f16 -> bf16
    (torch.float32, torch.bfloat16, torch.float32, 2),      # f32 -> bf16 -> f32 rounds: both casts stay
    (torch.float32, torch.float16, torch.bfloat16, 2),      # f32 -> f16 rounds (and overflows): both stay
])
def test_cast_chains(src, mid, dst, left):
    f = lambda m, x: torch.exp(x.to(mid).to(dst)) * 2.0     # noqa: E731
    torch.manual_seed(0)
    for shape in ((3, 8), (2, 1, 5)):
        x = (torch.randn(shape) * 300).to(src)              # f16 values beyond bf16's precision, f32 beyond f16's range
        gm, args = capture(Fn(f), x)
        r = rewrite(gm, Config(codegen="aten"))
        assert ops_of(gm, *CASTS) == 2 and ops_of(r.gm, *CASTS) == left, r.gm.code
        with torch.no_grad():
            out, ref = r.gm(*args)[0], Fn(f)(x)
        assert out.dtype == ref.dtype and torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,act,op", [("silu", SILU, "silu"), ("gelu", GELU, "gelu"), ("swiglu", SILU, "swiglu")])
def test_half_activations_computed_in_float32_are_the_half_op(dtype, name, act, op):
    """Export writes F.silu / F.gelu on half types as cast -> float32 math -> cast (how ATen computes them):
    that is the half-precision op, so it fuses (and the GLU around it), bit for bit as eager."""
    torch.manual_seed(0)
    m = (Glu(act) if name == "swiglu" else Fn(lambda m, x: act(x))).to(dtype)
    x = torch.randn(4, 8, dtype=dtype)
    gm, args = capture(m, x)
    r = rewrite(gm, Config(codegen="aten"))
    assert counts(r.gm)[op] == 1 and ops_of(r.gm, *CASTS) == 0, r.gm.code
    with torch.no_grad():
        out, ref = r.gm(*args)[0], m(x)
    assert out.dtype == dtype and torch.equal(out, ref)


# ---- scalar factors on matrix operands: constant folding over weights without a copy -----------------


class Scaled(nn.Module):
    """`fn(m, x)` over a [N, K] weight `w`, a [K, N] weight `wt` and an [N] bias `b`."""
    def __init__(self, fn, n: int = 16, k: int = 256):
        super().__init__()
        self.fn = fn
        self.w, self.wt = nn.Parameter(torch.randn(n, k) / 16), nn.Parameter(torch.randn(k, n) / 16)
        self.b = nn.Parameter(torch.randn(n))

    def forward(self, x):
        return self.fn(self, x)


def weight_scalings(gm) -> int:
    """mul/div/neg nodes applied directly to a weight (a `p_` placeholder) or to its transpose."""
    def of_weight(a):
        a = a.args[0] if a.op == "call_function" and a.target == aten.permute.default else a
        return a.op == "placeholder" and a.name.startswith("p_")
    return sum(n.op == "call_function" and n.target in (aten.mul.Tensor, aten.div.Tensor, aten.neg.default)
               and of_weight(n.args[0]) for n in gm.graph.nodes)


@pytest.mark.parametrize("name,fn", [
    ("linear_w_times_c", lambda m, x: F.linear(x, m.w * 0.5, m.b)),           # addmm(b, x, permute(w c))
    ("linear_w_over_c", lambda m, x: F.linear(x, m.w / 3.0)),                 # mm(x, permute(w c))
    ("linear_neg_w", lambda m, x: F.linear(x, -m.w, m.b)),                    # addmm(b, x, permute(-w))
    ("matmul_wt_times_c", lambda m, x: x @ (m.wt * 0.125)),                   # mm(x, w c)
    ("matmul_t_times_c", lambda m, x: x @ (m.w.t() * 2.0)),                   # mm(x, permute(w) c)
    ("matmul_neg_wt", lambda m, x: x @ -m.wt),                                 # mm(x, -w)
])
def test_scalar_factors_move_off_matrix_operands(name, fn):
    """x @ (w c) = (x @ w) c and its relatives: the weight is read in place (no scaled copy of it per call);
    the factor is applied to the (here 16x smaller) product. Several shapes: 2-D and 3-D x, one row."""
    shapes = [(8, 256), (2, 5, 256), (1, 256)] if name == "linear_w_times_c" else [(2, 5, 256)]
    m = Scaled(fn)
    r = check(m, shapes, {}, tol=TOL)
    assert "fold_scale" in r.fired, r.gm.code
    assert weight_scalings(r.gm) == 0, r.gm.code
    assert weight_scalings(capture(m, torch.randn(2, 5, 256))[0]) == 1


def test_tensor_factors_and_small_products_keep_the_weight_side():
    """A tensor factor (a per-column scale) is not a scalar: left alone. And where the product is larger
    than the weight (many rows, a small weight), scaling the weight stays the cheaper side: the cost model keeps it."""
    m = Scaled(lambda m, x: F.linear(x, m.w * m.b[:, None]))
    r = check(m, [(2, 5, 256)], {}, tol=TOL)
    assert "fold_scale" not in r.fired
    small = Scaled(lambda m, x: x @ (m.wt * 0.5), n=4, k=8)
    r = check(small, [(512, 8)], {}, tol=TOL)
    assert "fold_scale" not in r.fired and weight_scalings(r.gm) == 1, r.gm.code
