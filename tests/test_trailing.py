"""Reductions over several trailing dims, multi-dim layer norm and group norm (normalize, fusion/capture/trailing.py):
they become last-dim forms between flattening views, so the norm rules fire and the row kernels apply.
Each case runs through `fusion.optimize` and `torch.compile(backend="fusion")` and is compared with eager;
negative cases (non-trailing dims, a strided input) stay as they were and stay correct."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusion
from fusion.capture import normalize
from tests.test_rewrites import rel_err

aten = torch.ops.aten
TOL = 1e-4


class M(nn.Module):
    def __init__(self, fn, q=(3, 5), c=4):
        super().__init__()
        self.fn = fn
        g = torch.Generator().manual_seed(1)
        self.w = nn.Parameter(torch.randn(*q, generator=g))
        self.b = nn.Parameter(torch.randn(*q, generator=g))
        self.gw = nn.Parameter(torch.randn(c, generator=g))
        self.gb = nn.Parameter(torch.randn(c, generator=g))

    def forward(self, x):
        return self.fn(self, x)


def _hand_ln(m, x):
    mu = x.mean((-2, -1), keepdim=True)
    v = ((x - mu) ** 2).mean((-2, -1), keepdim=True)
    return (x - mu) / torch.sqrt(v + 1e-5) * m.w + m.b


def _hand_rms(m, x):
    return x * torch.rsqrt(x.pow(2).mean((-2, -1), keepdim=True) + 1e-6) * m.w


def _kernel_ops(opt) -> list[list[str]]:
    """Per generated kernel, the ATen/fusion op of each member node (`layer_norm_default` -> `layer_norm`)."""
    def op(name: str) -> str:
        for p in ("layer_norm", "rms_norm", "sum", "mean", "amax", "sub", "mul", "add", "silu"):
            if name.startswith(p):
                return p
        return name
    return [[op(n) for n in k.nodes] for g in opt.graphs for k in g.log.kernels]


def _err(out, ref) -> float:
    out, ref = (out, ref) if isinstance(ref, tuple) else ((out,), (ref,))
    assert len(out) == len(ref) and all(o.shape == r.shape for o, r in zip(out, ref))
    return max(rel_err(o, r) for o, r in zip(out, ref))


def _run(m: nn.Module, x: torch.Tensor, compile: bool = True):
    """fusion.optimize (and torch.compile) against eager; returns the optimized module."""
    m = m.eval()
    with torch.no_grad():
        ref = m(x)
        opt = fusion.optimize(m, (x,))
        assert not opt.graphs[0].log.fallbacks, opt.graphs[0].log.fallbacks
        err = _err(opt(x), ref)
        assert err <= TOL, f"optimize: rel err {err:.3g} at {tuple(x.shape)}"
        if compile:
            torch._dynamo.reset()
            err = _err(torch.compile(m, backend="fusion")(x), ref)
            assert err <= TOL, f"torch.compile: rel err {err:.3g} at {tuple(x.shape)}"
    return opt


SHAPES = [(2, 4, 3, 5), (1, 4, 3, 5)]


@pytest.mark.parametrize("name,fn,fused", [
    ("F.layer_norm", lambda m, x: F.layer_norm(x, (3, 5), m.w, m.b), "layer_norm"),
    ("hand_layer_norm", _hand_ln, "layer_norm"),
    ("hand_rms_norm", _hand_rms, "rms_norm"),
])
def test_norm_over_last_two_dims_is_one_norm_kernel(name, fn, fused):
    for shape in SHAPES if name == "hand_layer_norm" else SHAPES[:1]:
        opt = _run(M(fn), torch.randn(shape) * 3 + 1, compile=shape == SHAPES[0] and name != "hand_rms_norm")
        ks = _kernel_ops(opt)
        assert ks == [[fused]], (shape, ks, opt.graphs[0].gm.code)
    assert name == "F.layer_norm" or fused in opt.graphs[0].log.fired


def test_layer_norm_size_one_trailing_dims():
    # normalized over (1, 5) and (3, 1): the flattened row is 5 / 3 long
    for q, shape in (((1, 5), (2, 3, 1, 5)), ((3, 1), (2, 2, 3, 1))):
        opt = _run(M(lambda m, x, q=q: F.layer_norm(x, q, m.w, m.b), q=q), torch.randn(shape), compile=False)
        assert _kernel_ops(opt) == [["layer_norm"]]


def test_layer_norm_over_three_dims_without_affine():
    opt = _run(M(lambda m, x: F.layer_norm(x, (4, 3, 5))), torch.randn(2, 4, 3, 5), compile=False)
    assert _kernel_ops(opt) == [["layer_norm"]]


@pytest.mark.parametrize("op", ["sum", "mean", "amax"])
def test_trailing_reductions_become_row_reductions(op):
    def fn(m, x):
        r = getattr(x, op)((-1, -2), keepdim=True)   # any order of the trailing dims
        return (x - r) * 2.0, getattr(x, op)((1, 2))   # keepdim and not, on a rank-3 x
    opt = _run(M(fn), torch.randn(3, 4, 5), compile=op == "sum")
    code = opt.graphs[0].gm.code
    assert ", [1, 2]" not in code and ", [-1, -2]" not in code, code
    assert any(op in k and "sub" in k for k in _kernel_ops(opt)), _kernel_ops(opt)


def test_var_and_var_mean_over_trailing_dims():
    def fn(m, x):
        v, mu = torch.var_mean(x, (-2, -1), keepdim=True)
        return v + mu + torch.var(x, (2, 3), correction=0).unsqueeze(-1).unsqueeze(-1)
    _run(M(fn), torch.randn(2, 4, 3, 5), compile=False)
    _run(M(fn), torch.randn(2, 1, 1, 5), compile=False)


def _centre(t):
    return t - t.mean((-2, -1), keepdim=True)


@pytest.mark.parametrize("name,fn", [
    ("non_trailing", lambda m, x: x - x.mean((0, 2), keepdim=True)),
    ("middle", lambda m, x: x.amax((1, 2))),
    ("strided", lambda m, x: _centre(x.transpose(1, 3))),
])
def test_non_trailing_or_strided_reductions_stay(name, fn):
    x = torch.randn(2, 4, 3, 5)
    gm = torch.export.export(M(fn), (x,)).run_decompositions().graph_module
    before = [n for n in gm.graph.nodes if n.target in (aten.mean.dim, aten.amax.default)]
    dims = [n.args[1] for n in before]
    normalize(gm)
    after = [n.args[1] for n in gm.graph.nodes if n.target in (aten.mean.dim, aten.amax.default)]
    assert after == dims and not any(n.target is aten.view.default for n in gm.graph.nodes), gm.code
    _run(M(fn), x, compile=name == "non_trailing")


@pytest.mark.parametrize("shape,groups,affine", [
    ((2, 6, 5, 7), 3, True), ((1, 6, 1, 1), 2, True), ((3, 6, 8), 6, False), ((2, 6), 1, True),
])
def test_group_norm(shape, groups, affine):
    def fn(m, x):
        return F.group_norm(x, groups, m.gw if affine else None, m.gb if affine else None, eps=1e-5)
    opt = _run(M(fn, c=6), torch.randn(shape) * 2 + 0.5, compile=shape == (2, 6, 5, 7))
    code = opt.graphs[0].gm.code
    assert "group_norm" not in code, code
    ks = _kernel_ops(opt)
    assert ks[0] == ["layer_norm"] and len(ks) == (2 if affine else 1), ks


def test_group_norm_then_silu_fuses_the_affine_with_the_activation():
    class Block(nn.Module):   # the diffusion-UNet pattern: GroupNorm -> SiLU
        def __init__(self):
            super().__init__()
            self.gn = nn.GroupNorm(4, 8)
            nn.init.normal_(self.gn.weight)
            nn.init.normal_(self.gn.bias)

        def forward(self, x):
            return F.silu(self.gn(x))
    opt = _run(Block(), torch.randn(2, 8, 6, 6), compile=False)
    ks = _kernel_ops(opt)
    assert len(ks) == 2 and ks[0] == ["layer_norm"] and "silu" in ks[1], ks


def test_training_layer_norm_over_two_dims_keeps_statistics():
    """mean/rstd feed the backward: the ATen op stays, gradients match eager."""
    m = M(lambda m, x: F.layer_norm(x, (3, 5), m.w, m.b)).train()
    ref = M(lambda m, x: F.layer_norm(x, (3, 5), m.w, m.b)).train()
    x = torch.randn(2, 4, 3, 5)
    torch._dynamo.reset()
    out = torch.compile(m, backend="fusion")(x)
    want = ref(x)
    assert rel_err(out, want) <= TOL
    out.square().sum().backward()
    want.square().sum().backward()
    assert rel_err(m.w.grad, ref.w.grad) <= TOL


def test_flattened_graph_is_valid_fx():
    x = torch.randn(2, 4, 3, 5)
    gm = torch.export.export(M(_hand_ln), (x,)).run_decompositions().graph_module
    normalize(gm)
    assert not any(n.target in (aten.mean.dim,) and len(n.args[1]) > 1 for n in gm.graph.nodes)
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is not operator.getitem:
            assert "val" in n.meta, n
