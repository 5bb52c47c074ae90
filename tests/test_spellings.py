"""Fusions fire however the code is written: a table of spellings that real model code uses for softmax,
log-softmax, layer norm, RMSNorm, GELU, SiLU and gated units, each captured as the driver captures it
(export + core-ATen decompositions + normalize), rewritten, and checked two ways: the fused op appears, and
the rewritten graph equals eager (fp32 relative 1e-4; half types within a few of their ulps: eager rounds at
every op, the fused op once). Negative spellings (a different function that looks alike) must not fire.
Every case runs in fp32 with static shapes and with a symbolic batch; a subset in bf16 and fp16 (all of
them under -m slow)."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusion.capture import normalize
from fusion.config import Config
from fusion.dialect.ops import FUSED_OPS
from fusion.rewrite import rewrite
from torch.export.graph_signature import InputKind

from .conftest import rel_err

N = 64


class Site(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f
        g = torch.Generator().manual_seed(1)
        self.w = nn.Parameter(torch.randn(N, generator=g))
        self.b = nn.Parameter(torch.randn(N, generator=g))

    def forward(self, x):
        return self.f(self, x)


def _ln_stats(x):
    u = x.mean(-1, keepdim=True)
    return u, x - u


POSITIVE = {   # name: (spelling, the fused op it must become)
    # softmax
    "softmax_max_values": (lambda s, x: (lambda e: e / e.sum(-1, keepdim=True))(torch.exp(x - x.max(-1, keepdim=True).values)), "softmax"),
    "softmax_max_index0": (lambda s, x: (lambda e: e / e.sum(-1, keepdim=True))(torch.exp(x - x.max(-1, keepdim=True)[0])), "softmax"),
    "softmax_max_nokeep": (lambda s, x: (lambda e: e / e.sum(-1)[..., None])(torch.exp(x - x.max(-1).values.unsqueeze(-1))), "softmax"),
    "softmax_amax": (lambda s, x: (lambda e: e / e.sum(-1, keepdim=True))((x - x.amax(-1, keepdim=True)).exp()), "softmax"),
    "softmax_unstable": (lambda s, x: x.exp() / x.exp().sum(-1, keepdim=True), "softmax"),
    "softmax_times_reciprocal": (lambda s, x: (lambda e: e * (1.0 / e.sum(-1, keepdim=True)))(torch.exp(x - x.amax(-1, keepdim=True))), "softmax"),
    "softmax_torch_reciprocal": (lambda s, x: (lambda e: e * torch.reciprocal(e.sum(-1, keepdim=True)))(torch.exp(x - x.amax(-1, keepdim=True))), "softmax"),
    "softmax_scaled_div": (lambda s, x: torch.softmax(x / 8.0, -1), "softmax"),
    "softmax_in_fp32": (lambda s, x: F.softmax(x.float(), dim=-1).to(x.dtype), "softmax"),
    "softmax_dtype_arg": (lambda s, x: F.softmax(x, dim=-1, dtype=torch.float32).to(x.dtype), "softmax"),
    "softmax_dim1": (lambda s, x: (lambda e: e / e.sum(1, keepdim=True))(torch.exp(x - x.amax(1, keepdim=True))), "softmax"),
    "log_softmax_hand": (lambda s, x: (lambda y: y - y.exp().sum(-1, keepdim=True).log())(x - x.max(-1, keepdim=True).values), "log_softmax"),
    "log_softmax_F": (lambda s, x: F.log_softmax(x, -1), "log_softmax"),
    "log_softmax_logsumexp": (lambda s, x: x - torch.logsumexp(x, -1, keepdim=True), "log_softmax"),
    "log_softmax_logsumexp_dim1": (lambda s, x: x - x.logsumexp(1, keepdim=True), "log_softmax"),
    "log_of_softmax": (lambda s, x: torch.log(torch.softmax(x, dim=-1)), "log_softmax"),
    # layer norm
    "ln_weight_first_div_sqrt": (lambda s, x: (lambda u, d: s.w * d / torch.sqrt((d ** 2).mean(-1, keepdim=True) + 1e-5) + s.b)(*_ln_stats(x)), "layer_norm"),
    "ln_var_unbiased_false": (lambda s, x: (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-5) * s.w + s.b, "layer_norm"),
    "ln_var_correction0": (lambda s, x: (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, keepdim=True, correction=0) + 1e-5) * s.w + s.b, "layer_norm"),
    "ln_var_mean": (lambda s, x: (lambda vu: (x - vu[1]) * torch.rsqrt(vu[0] + 1e-6) * s.w + s.b)(torch.var_mean(x, -1, keepdim=True, unbiased=False)), "layer_norm"),
    "ln_pow_sqrt_method": (lambda s, x: (lambda u, d: s.w * (d / (d.pow(2).mean(-1, keepdim=True) + 1e-12).sqrt()) + s.b)(*_ln_stats(x)), "layer_norm"),
    "ln_times_one_over_sqrt": (lambda s, x: (lambda u, d: d * (1.0 / torch.sqrt((d * d).mean(-1, keepdim=True) + 1e-5)) * s.w + s.b)(*_ln_stats(x)), "layer_norm"),
    "ln_e_x2_minus_mean2": (lambda s, x: (lambda u: (x - u) * torch.rsqrt((x * x).mean(-1, keepdim=True) - u * u + 1e-5) * s.w + s.b)(x.mean(-1, keepdim=True)), "layer_norm"),
    "ln_sum_over_n": (lambda s, x: (lambda u: (x - u) / torch.sqrt(((x - u) ** 2).sum(-1, keepdim=True) / N + 1e-5) * s.w + s.b)(x.sum(-1, keepdim=True) / N), "layer_norm"),
    "ln_no_affine": (lambda s, x: (lambda u, d: d / torch.sqrt((d ** 2).mean(-1, keepdim=True) + 1e-5))(*_ln_stats(x)), "layer_norm"),
    "ln_F": (lambda s, x: F.layer_norm(x, (N,), s.w, s.b, 1e-5), "layer_norm"),
    # RMSNorm
    "rms_llama": (lambda s, x: s.w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)), "rms_norm"),
    "rms_llama_casts": (lambda s, x: s.w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype), "rms_norm"),
    "rms_div_sqrt": (lambda s, x: x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * s.w, "rms_norm"),
    "rms_weight_first_div": (lambda s, x: s.w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), "rms_norm"),
    "rms_one_over_sqrt": (lambda s, x: x * (1.0 / torch.sqrt(torch.mean(x ** 2, dim=-1, keepdim=True) + 1e-6)) * s.w, "rms_norm"),
    "rms_pow_minus_half": (lambda s, x: x * (x.pow(2).mean(-1, keepdim=True) + 1e-6).pow(-0.5) * s.w, "rms_norm"),
    "rms_gemma_one_plus_w": (lambda s, x: (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + s.w.float())).type_as(x), "rms_norm"),
    "rms_F": (lambda s, x: F.rms_norm(x, (N,), s.w, 1e-6), "rms_norm"),
    # activations
    "gelu_erf_div_sqrt2": (lambda s, x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0))), "gelu"),
    "gelu_erf_mul": (lambda s, x: x * 0.5 * (1.0 + torch.erf(x * 0.7071067811865476)), "gelu"),
    "gelu_tanh_pow3": (lambda s, x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))), "gelu"),
    "gelu_tanh_xxx": (lambda s, x: 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))), "gelu"),
    "gelu_tanh_factored": (lambda s, x: x * 0.5 * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))), "gelu"),
    "gelu_quick": (lambda s, x: x * torch.sigmoid(1.702 * x), "gelu_quick"),
    "silu_sigmoid": (lambda s, x: x * torch.sigmoid(x), "silu"),
    "silu_exp": (lambda s, x: x / (1 + torch.exp(-x)), "silu"),
    "swiglu_chunk": (lambda s, x: (lambda a, b: F.silu(a) * b)(*x.chunk(2, -1)), "swiglu"),
    "geglu_chunk": (lambda s, x: (lambda a, b: a * F.gelu(b))(*x.chunk(2, -1)), "geglu"),
}

NEGATIVE = {   # look-alikes that compute another function: the fused op must not appear
    "logsumexp_of_other": (lambda s, x: x - torch.logsumexp(2.0 * x, -1, keepdim=True), "log_softmax"),
    "logsumexp_other_dim": (lambda s, x: x - torch.logsumexp(x, 1, keepdim=True).mean(-1, keepdim=True), "log_softmax"),
    "ln_eps_outside_sqrt": (lambda s, x: (lambda u, d: s.w * d / (x.std(-1, keepdim=True, unbiased=False) + 1e-6) + s.b)(*_ln_stats(x)), "layer_norm"),
    "ln_unbiased_variance": (lambda s, x: (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + 1e-5), "layer_norm"),
    "ln_over_dim_1": (lambda s, x: (lambda u: (x - u) / torch.sqrt(((x - u) ** 2).mean(1, keepdim=True) + 1e-5))(x.mean(1, keepdim=True)), "layer_norm"),
    "rms_eps_outside_norm": (lambda s, x: s.w * x / (x.norm(2, dim=-1, keepdim=True) * N ** -0.5 + 1e-6), "rms_norm"),
    "rms_mean_of_abs": (lambda s, x: x * torch.rsqrt(x.abs().mean(-1, keepdim=True) + 1e-6), "rms_norm"),
    "gelu_rounded_constant": (lambda s, x: 0.5 * x * (1.0 + torch.erf(x * 0.7071)), "gelu"),
    "gelu_tanh_wrong_cubic": (lambda s, x: 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.04 * x * x * x))), "gelu"),
    "softmax_plus_eps": (lambda s, x: (lambda e: e / (e.sum(-1, keepdim=True) + 1e-9))(torch.exp(x)), "softmax"),
}

HALF_SUBSET = ["softmax_max_values", "softmax_in_fp32", "log_softmax_hand", "ln_var_mean", "ln_F", "rms_llama_casts",
               "rms_F", "gelu_tanh_factored", "silu_sigmoid", "swiglu_chunk"]


def _rewritten(m: nn.Module, x: torch.Tensor, symbolic: bool):
    dyn = {"x": {0: torch.export.Dim("batch", min=2, max=64)}} if symbolic else None
    ep = torch.export.export(m, (x,), dynamic_shapes=dyn).run_decompositions()
    state = {**ep.state_dict, **ep.constants}
    args = [x if s.kind == InputKind.USER_INPUT else state[s.target] for s in ep.graph_signature.input_specs]
    gm = normalize(ep.graph_module)
    return rewrite(gm, Config()).gm, args


def _fused(gm) -> Counter:
    return Counter(FUSED_OPS[n.target] for n in gm.graph.nodes if n.op == "call_function" and n.target in FUSED_OPS)


def _case(name: str, dtype: torch.dtype, symbolic: bool, table: dict):
    f, op = table[name]
    torch.manual_seed(0)
    m = Site(f).to(dtype)
    x = torch.randn(4, 8, 2 * N if name.endswith("_chunk") else N).to(dtype)
    gm, args = _rewritten(m, x, symbolic)
    with torch.no_grad():
        out, ref = gm(*args)[0], m(x)
    return _fused(gm), op, out, ref


TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("symbolic", [False, True], ids=["static", "symbolic"])
@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_spelling_fuses_fp32(name, symbolic):
    if symbolic and name in ("softmax_unstable", "log_softmax_logsumexp"):
        pytest.xfail("known gap: with a symbolic batch no layout (contig) fact is set, the fused row op and the "
                     "as-written exp/sum/div or exp/sum/log (one row kernel either way) price the same, and extraction keeps the input")
    got, op, out, ref = _case(name, torch.float32, symbolic, POSITIVE)
    assert got[op] == 1, (name, dict(got))
    assert rel_err(out, ref) <= TOL[torch.float32]


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_look_alike_does_not_fuse(name):
    got, op, out, ref = _case(name, torch.float32, False, NEGATIVE)
    assert got[op] == 0, (name, dict(got))
    assert rel_err(out, ref) <= 1e-5


def _half_params():
    for dtype in (torch.bfloat16, torch.float16):
        for name in sorted(POSITIVE):
            marks = () if name in HALF_SUBSET else (pytest.mark.slow,)
            yield pytest.param(name, dtype, marks=marks, id=f"{name}-{str(dtype).removeprefix('torch.')}")


@pytest.mark.parametrize("name, dtype", list(_half_params()))
def test_spelling_fuses_half(name, dtype):
    got, op, out, ref = _case(name, dtype, False, POSITIVE)
    assert got[op] == 1, (name, dtype, dict(got))
    assert rel_err(out, ref) <= TOL[dtype]
