"""Triton kernels (fusion.backends.triton.render*) vs eager, run by the Triton interpreter on CPU tensors.

TRITON_INTERPRET=1 is set before triton is imported, so every @triton.jit kernel (generated row /
pointwise kernels, attention, GEMM + epilogue) runs as numpy on the CPU: this checks correctness, not
speed (bench/gpu.py measures speed on a GPU). Kernel IR comes from the real pipeline:
torch.export -> run_decompositions -> fusion.capture.normalize -> fusion.lower.schedule -> fusion.lower.kernel_ir.
The scheduler only groups fp32 nodes, so fp16/bf16 cases export in fp32 and call the same kernels with
half-precision tensors (outputs take the inputs' dtype, arithmetic is fp32 inside the kernel).
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="triton is not importable")

import fusion.dialect.ops  # noqa: F401
from fusion.capture import normalize
from fusion.backends.triton import runtime as TR
from fusion.backends.triton.render import render_triton
from fusion.backends.triton.attention import triton_attention
from fusion.backends.triton.gemm import choose_strategy, linear_epilogue, triton_linear_epilogue, vendor_linear_epilogue
from fusion.backends.triton.lower import build_kernels, lower_to_triton
from fusion.config import Config
from .conftest import aten_graph

# numpy warnings from masked-off lanes (rows past the end of a row block, padded query rows): harmless
pytestmark = pytest.mark.filterwarnings("ignore:(divide by zero|invalid value) encountered:RuntimeWarning")

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return Config(cache_dir=str(tmp_path_factory.mktemp("fusion-triton-cache")))


def graph(f, args):
    return normalize(aten_graph(f, args))


def relerr(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def check(f, args, cfg, call_args=(), n_kernels=None, looped=False, kinds=None):
    res = lower_to_triton(graph(f, args), cfg, dtypes_from="inputs")
    mods = [m for m in res.gm.modules() if isinstance(m, TR.TritonKernel)]
    if n_kernels is not None:
        assert len(mods) == n_kernels, res.gm.code
    if kinds is not None:
        assert sorted(m.kind for m in mods) == sorted(kinds), [m.kind for m in mods]
    for m in mods:
        assert os.path.exists(m.source_path)
        if looped:
            m.max_single = 0
    for a in [args] + list(call_args):
        ref = f(*[x.float() if x.is_floating_point() else x for x in a])
        out = res.gm(*a)
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        dt = next((x.dtype for x in a if x.is_floating_point()), torch.float32)
        for o, r in zip(outs, refs):
            assert o.shape == r.shape, (o.shape, r.shape)
            if r.dtype == torch.bool:
                assert torch.equal(o, r)
            else:
                assert o.dtype == dt
                assert relerr(o, r) <= TOL[dt], (relerr(o, r), dt)
    return res, mods


def stable_softmax(x):
    m = x.amax(-1, keepdim=True)
    e = torch.exp(x - m)
    return e / e.sum(-1, keepdim=True)


def rms_norm(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


# ------------------------------------------------------------------------------ row kernels
@pytest.mark.parametrize("looped", [False, True])
def test_softmax_single_and_looped(cfg, looped):
    x = torch.randn(3, 37)
    _, mods = check(stable_softmax, (x,), cfg, call_args=[(torch.randn(5, 300) * 20,)] if not looped else [],
                    n_kernels=1, looped=looped, kinds=["row_reduction"])
    src = Path(mods[0].source_path).read_text()
    assert "_single(" in src and "_loop(" in src and "tl.exp" in src


def test_softmax_looped_multi_block(cfg):
    """Looped kernel with several column blocks (block forced small) and log_softmax."""
    f = lambda x: (F.softmax(x, -1), F.log_softmax(x, -1))
    res, mods = check(f, (torch.randn(2, 70),), cfg)
    old = TR.LOOP_BLOCK
    try:
        TR.LOOP_BLOCK = 16
        for m in mods:
            m.max_single = 0
        x = torch.randn(3, 70) * 5
        for o, r in zip(res.gm(x), f(x)):
            assert relerr(o, r) <= 1e-4
    finally:
        TR.LOOP_BLOCK = old


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_layer_norm(cfg, dtype):
    x, w, b = torch.randn(4, 48), torch.randn(48), torch.randn(48)
    f = lambda x, w, b: F.layer_norm(x, (48,), w, b, 1e-5)
    res = lower_to_triton(graph(f, (x, w, b)), cfg, dtypes_from="inputs")
    assert len(res.kernels) == 1
    a = [t.to(dtype) for t in (x * 3 + 1, w, b)]
    (out,) = res.gm(*a)
    assert out.dtype == dtype
    assert relerr(out, f(*[t.float() for t in a])) <= TOL[dtype]


def test_layer_norm_looped_and_rms_norm(cfg):
    x, w = torch.randn(4, 64), torch.randn(64)
    check(lambda x, w: F.layer_norm(x, (64,), w, None, 1e-5), (x, w), cfg, n_kernels=1, looped=True)
    check(rms_norm, (x, w), cfg, call_args=[(x.half(), w.half())], n_kernels=1)
    check(rms_norm, (x, w), cfg, n_kernels=1, looped=True)


def test_var_mean_row_outputs(cfg):
    f = lambda x: (x.var(-1), x.mean(-1, keepdim=True), x.amin(-1))
    check(f, (torch.randn(5, 33),), cfg)
    check(f, (torch.randn(5, 33),), cfg, looped=True)


def test_masked_softmax_additive_and_bool(cfg):
    f = lambda s, m: F.softmax(s * 0.125 + m, -1)
    s, m = torch.randn(2, 3, 8, 8), torch.randn(8, 8)
    check(f, (s, m), cfg, n_kernels=1)
    g = lambda s, keep: F.softmax(s.masked_fill(~keep, float("-inf")), -1)
    keep = torch.rand(2, 1, 1, 8) > 0.3
    keep[..., 0] = True
    check(g, (s, keep), cfg, n_kernels=1)


# ------------------------------------------------------------------------------ pointwise
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gelu_bias_residual(cfg, dtype):
    f = lambda x, b, r: F.gelu(x + b) + r
    x, b, r = torch.randn(8, 96), torch.randn(96), torch.randn(8, 96)
    res = lower_to_triton(graph(f, (x, b, r)), cfg, dtypes_from="inputs")
    assert [k.kind for k in res.kernels] == ["pointwise"]
    a = [t.to(dtype) for t in (x, b, r)]
    (out,) = res.gm(*a)
    assert out.dtype == dtype and relerr(out, f(*[t.float() for t in a])) <= TOL[dtype]
    xt = torch.randn(96, 8).t()                                    # non-contiguous: strides, no copy
    assert relerr(res.gm(xt, b, r)[0], f(xt, b, r)) <= 1e-4


def test_silu_mul_flat_and_tanh_pow(cfg):
    f = lambda g, a: F.silu(g) * a
    _, mods = check(f, (torch.randn(4, 700), torch.randn(4, 700)), cfg, n_kernels=1,
                    call_args=[(torch.randn(3, 5), torch.randn(3, 5))])
    assert mods[0].spec.flatten
    h = lambda x, y: torch.tanh(x) * torch.sigmoid(y) + x.clamp(-0.5, 0.5) + y.abs().pow(1.5) + x.pow(3)
    check(h, (torch.randn(6, 40), torch.randn(6, 40)), cfg)
    check(lambda x: F.gelu(x, approximate="tanh") - torch.relu(x), (torch.randn(4, 50),), cfg)


def test_bool_mask_outputs(cfg):
    f = lambda x, y: (x > y, torch.where(x > 0, x, y * 2.0))
    check(f, (torch.randn(5, 40), torch.randn(5, 40)), cfg)


def test_render_is_deterministic_and_cached(cfg):
    gm = graph(stable_softmax, (torch.randn(2, 9),))
    (ir, k1), = build_kernels(gm, cfg.cache_dir)
    assert render_triton(ir) == Path(k1.source_path).read_text()
    (_, k2), = build_kernels(graph(stable_softmax, (torch.randn(2, 9),)), cfg.cache_dir)
    assert k2.module is k1.module


# ------------------------------------------------------------------------------ attention
def _attn_ref(q, k, v, mask, scale, causal):
    return torch.ops.fusion.attention(q.float(), k.float(), v.float(),
                                      mask if mask is None or mask.dtype == torch.bool else mask.float(),
                                      scale, causal)


@pytest.mark.parametrize("causal,mask_kind,gqa,S,L", [
    (True, None, False, 24, 24),
    (False, "bool", False, 20, 20),
    (False, "float", True, 17, 29),
    (True, "bool", True, 13, 21),
])
def test_attention(causal, mask_kind, gqa, S, L):
    torch.manual_seed(0)
    B, H, D = 2, 4, 16
    Hkv = 2 if gqa else H
    q, k, v = torch.randn(B, H, S, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(B, 1, 1, L) > 0.3
        mask[..., 0] = True
    elif mask_kind == "float":
        mask = torch.randn(S, L)
    out = triton_attention(q, k, v, mask, 0.3, causal)
    assert relerr(out, _attn_ref(q, k, v, mask, 0.3, causal)) <= 1e-4


def test_attention_fp16():
    q, k, v = (torch.randn(1, 2, 16, 16).half() for _ in range(3))
    out = triton_attention(q, k, v, None, None, True)
    assert out.dtype == torch.float16
    assert relerr(out, _attn_ref(q, k, v, None, 0.25, True)) <= 1e-2


# ------------------------------------------------------------------------------ GEMM + epilogue
@pytest.mark.parametrize("act", [None, "gelu", "silu", "relu"])
def test_linear_epilogue(act):
    torch.manual_seed(0)
    x, w, b, r = torch.randn(2, 9, 40), torch.randn(24, 40), torch.randn(24), torch.randn(2, 9, 24)
    f = {None: lambda y: y, "gelu": F.gelu, "silu": F.silu, "relu": F.relu}[act]
    ref = f(F.linear(x, w, b)) + r
    assert relerr(triton_linear_epilogue(x, w, b, act, r, block_m=16, block_n=16, block_k=16), ref) <= 1e-4
    assert relerr(vendor_linear_epilogue(x, w, b, act, r), ref) <= 1e-4
    assert relerr(linear_epilogue(x, w, None, act, None), f(F.linear(x, w))) <= 1e-4


def test_linear_epilogue_fp16_and_choice():
    x, w, b = torch.randn(16, 32).half(), torch.randn(16, 32).half(), torch.randn(16).half()
    out = triton_linear_epilogue(x, w, b, "gelu", None, block_m=16, block_n=16, block_k=16)
    assert out.dtype == torch.float16
    assert relerr(out, F.gelu(F.linear(x.float(), w.float(), b.float()))) <= 1e-2
    small, t = choose_strategy(16, 4096, 4096, torch.float16, True, True, act="gelu")
    big, _ = choose_strategy(8192, 8192, 8192, torch.float16, True, False)
    assert small == "triton" and big == "vendor" and set(t) == {"triton", "vendor"}


def test_graph_dtypes_default(cfg):
    """lower_to_triton's default: output dtypes are the graph's (here fp32 and bool), whatever is passed in."""
    f = lambda x: (F.softmax(x, -1), x > 0)
    x = torch.randn(3, 20)
    res = lower_to_triton(graph(f, (x,)), cfg)
    a, b = res.gm(x.half())
    assert a.dtype == torch.float32 and b.dtype == torch.bool and torch.equal(b, x.half() > 0)
    assert relerr(a, F.softmax(x.half().float(), -1)) <= 1e-4
