"""The attention family: every form of `softmax(q k^T * scale + mask) v` that eager code and HF
models produce (scale on q, k or the scores, by mul or div; additive masks of several broadcast
shapes; 3-D and 4-D; grouped-query via repeat_kv) becomes one `fusion.attention`, and matches eager.
Negative tests: what SDPA cannot express must not fire. Counts and numerics only, never e-graph sizes."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from fusion.config import Config
from fusion.errors import FusionFallbackWarning
from fusion.rewrite import rewrite
from tests.test_rewrites import capture, rel_err

ATTN = torch.ops.fusion.attention.default


class Attn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def run(fn, *inputs: torch.Tensor, config: Config | None = None):
    gm, args = capture(Attn(fn), *inputs)
    result = rewrite(gm, config or Config())
    with torch.no_grad():
        out = result.gm(*args)[0]
        ref = fn(*inputs)
    return result, out, ref


def n_attn(result) -> int:
    return sum(1 for n in result.gm.graph.nodes if n.target is ATTN)


def check(fn, *inputs, expect: int = 1, tol: float = 2e-5):
    result, out, ref = run(fn, *inputs)
    assert n_attn(result) == expect, result.gm.graph
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= tol, rel_err(out, ref)
    return result


def qkv(b: int, h: int, s: int, l: int, d: int, hkv: int | None = None):
    g = torch.Generator().manual_seed(b * 1000 + h * 100 + s * 10 + l)
    q = torch.randn(b, h, s, d, generator=g)
    k = torch.randn(b, hkv or h, l, d, generator=g)
    v = torch.randn(b, hkv or h, l, d, generator=g)
    return q, k, v


SHAPES = [(2, 4, 8, 8, 16), (1, 1, 1, 5, 8), (1, 3, 6, 1, 4), (2, 2, 7, 9, 8)]
FORMS = {
    "mul_scores": lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5), -1) @ v,
    "div_scores": lambda q, k, v: torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1]), dim=-1) @ v,
    "scale_q": lambda q, k, v: torch.softmax((q * 0.125) @ k.transpose(-1, -2), -1) @ v,
    "div_k": lambda q, k, v: torch.softmax(q @ (k / 3.0).transpose(-1, -2), -1) @ v,
    "scale_both": lambda q, k, v: torch.softmax((q * 0.5) @ (k * 0.25).transpose(-1, -2), -1) @ v,
    "no_scale": lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1) @ v,
    "permute_k": lambda q, k, v: torch.softmax(q @ k.permute(0, 1, 3, 2) * 0.3, -1) @ v,
}


DEFAULT_FORMS = ["div_k", "div_scores", "mul_scores", "no_scale", "scale_q"]   # all of them: the slow variant


@pytest.mark.parametrize("form,shape", [(f, SHAPES[i % len(SHAPES)]) for i, f in enumerate(DEFAULT_FORMS)])
def test_scale_forms(form, shape):
    check(FORMS[form], *qkv(*shape))


@pytest.mark.slow
@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("shape", SHAPES)
def test_scale_forms_all_shapes(form, shape):
    check(FORMS[form], *qkv(*shape))


MASKS = ["bhsl", "b11l", "sl", "bh1l", "1111"]


@pytest.mark.parametrize("mask_shape,shape", [(m, SHAPES[i % len(SHAPES)]) for i, m in enumerate(MASKS[:3])])
def test_additive_mask_broadcasts(mask_shape, shape):
    _masked(shape, mask_shape)


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_shape", MASKS)
def test_additive_mask_broadcasts_all_shapes(shape, mask_shape):
    _masked(shape, mask_shape)


def _masked(shape, mask_shape):
    b, h, s, l, _ = shape
    dims = {"b": b, "h": h, "s": s, "l": l, "1": 1}
    mask = torch.randn(*[dims[c] for c in mask_shape])
    mask[..., 0] = torch.finfo(torch.float32).min          # a masked-out key, HF style
    check(lambda q, k, v, m: torch.softmax(q @ k.transpose(-1, -2) * 0.25 + m, -1) @ v, *qkv(*shape), mask)


def test_mask_first_operand():
    q, k, v = qkv(2, 4, 8, 8, 16)
    m = torch.randn(2, 1, 8, 8)
    check(lambda q, k, v, m: torch.softmax(m + q @ k.transpose(-1, -2) / 4.0, -1) @ v, q, k, v, m)


def test_three_dim_attention():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 7, 16, generator=g) for _ in range(3))
    m = torch.randn(7, 7)
    check(lambda q, k, v, m: torch.softmax(q @ k.transpose(1, 2) * 0.25 + m, -1) @ v, q, k, v, m)


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:   # transformers' repeat_kv
    b, h, l, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, l, d).reshape(b, h * n, l, d)


@pytest.mark.parametrize("h,hkv", [(4, 2), (6, 1), (4, 4)])
def test_grouped_query_attention(h, hkv):
    q, k, v = qkv(2, h, 5, 5, 8, hkv=hkv)
    m = torch.randn(2, 1, 5, 5)
    n = h // hkv
    result = check(lambda q, k, v, m: torch.softmax(q @ _repeat_kv(k, n).transpose(2, 3) * 0.35 + m, -1) @ _repeat_kv(v, n),
                   q, k, v, m)
    node = next(n for n in result.gm.graph.nodes if n.target is ATTN)
    assert node.args[1].meta["val"].shape[1] == hkv          # the GQA form: k/v keep their own heads


def test_dropout_in_eval_is_identity():
    drop = nn.Dropout(0.1).eval()
    check(lambda q, k, v: drop(torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1)) @ v, *qkv(2, 2, 4, 4, 8))


MIN = torch.finfo(torch.float32).min


class Gpt2Causal(nn.Module):
    """The older HF GPT-2 eager form: a sliced bool buffer and `torch.where(causal_mask, w, mask_value)`."""
    def __init__(self, n: int = 16):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n))

    def forward(self, q, k, v):
        w = q @ k.transpose(-1, -2) / (v.size(-1) ** 0.5)
        s, l = q.size(-2), k.size(-2)
        causal = self.bias[:, :, l - s:l, :l]
        w = torch.where(causal, w, torch.full([], MIN, dtype=w.dtype))
        return torch.softmax(w, -1) @ v


@pytest.mark.parametrize("name,fn", [
    ("where_keep_min", lambda q, k, v, b: torch.softmax(torch.where(b, q @ k.transpose(-1, -2) / 8.0, MIN), -1) @ v),
    ("masked_fill_inf", lambda q, k, v, b: torch.softmax((q @ k.transpose(-1, -2) * 0.25).masked_fill(~b, float("-inf")), -1) @ v),
])
@pytest.mark.parametrize("mask", ["causal", "row_fully_masked"])
def test_boolean_masks(name, fn, mask):
    q, k, v = qkv(2, 2, 5, 5, 8)
    b = torch.ones(5, 5, dtype=torch.bool).tril()
    if mask == "row_fully_masked":
        if name == "masked_fill_inf":
            pytest.skip("eager gives NaN rows there")
        b[0] = False                                      # eager: a uniform row (all scores = min): so must we
    check(fn, q, k, v, b)


def test_gpt2_sliced_bool_buffer_causal_mask():
    m = Gpt2Causal()
    q, k, v = qkv(1, 2, 6, 6, 8)
    gm, args = capture(m, q, k, v)
    result = rewrite(gm, Config())
    assert n_attn(result) == 1
    with torch.no_grad():
        assert rel_err(result.gm(*args)[0], m(q, k, v)) < 2e-5


def test_boolean_mask_with_a_mild_fill_does_not_fire():
    q, k, v = qkv(2, 2, 5, 5, 8)
    b = torch.ones(5, 5, dtype=torch.bool).tril()          # -1e4 is not "masked out": softmax still sees it
    check(lambda q, k, v, b: torch.softmax(torch.where(b, q @ k.transpose(-1, -2), -1e4), -1) @ v, q, k, v, b, expect=0)


# --- must not fire -------------------------------------------------------------------------------------
def test_softmax_over_query_dim_does_not_fire():
    check(lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) * 0.25, -2) @ v, *qkv(2, 2, 6, 6, 8), expect=0)


def test_mask_that_grows_the_scores_does_not_fire():
    q, k, v = qkv(1, 2, 4, 4, 8)
    m = torch.randn(3, 1, 2, 4, 4)                          # broadcasts the scores to rank 5: not an SDPA mask
    check(lambda q, k, v, m: torch.softmax(q @ k.transpose(-1, -2) * 0.25 + m, -1) @ v, q, k, v, m, expect=0)


def test_rank_one_mask_does_not_fire():
    q, k, v = qkv(2, 2, 4, 5, 8)
    m = torch.randn(5)                                      # broadcastable, but SDPA's CPU kernel needs rank >= 2
    check(lambda q, k, v, m: torch.softmax(q @ k.transpose(-1, -2) * 0.25 + m, -1) @ v, q, k, v, m, expect=0)


def test_tensor_scale_does_not_fire_as_a_constant():
    q, k, v = qkv(2, 2, 4, 4, 8)
    t = torch.tensor(0.3)
    check(lambda q, k, v, t: torch.softmax(q @ k.transpose(-1, -2) * t, -1) @ v, q, k, v, t, expect=0)


def test_scores_not_from_k_transposed_do_not_fire():
    q, k, v = qkv(2, 2, 8, 8, 8)
    check(lambda q, k, v: torch.softmax(q @ k * 0.25, -1) @ v, q, k, v, expect=0)   # q @ k, not q @ k^T


def test_disable_attention_family():
    q, k, v = qkv(2, 2, 4, 4, 8)
    result, _, _ = run(FORMS["mul_scores"], q, k, v, config=Config(disable_rules=frozenset({"attention"})))
    assert n_attn(result) == 0


def test_bf16_attention_matches_eager_within_bf16():
    q, k, v = (t.bfloat16() for t in qkv(2, 4, 8, 8, 16))
    check(FORMS["mul_scores"], q, k, v, tol=3e-2)


def test_runtime_causal_mask_detection_is_exact():
    """fusion.attention takes SDPA's causal path only when the mask is exactly causal; results agree."""
    import fusion.dialect.ops as ops

    torch.manual_seed(0)
    S, L = 9, 9
    q, k, v = torch.randn(2, 3, S, 8), torch.randn(2, 3, L, 8), torch.randn(2, 3, L, 8)
    tril = torch.ones(S, L, dtype=torch.bool).tril()
    additive = torch.zeros(1, 1, S, L).masked_fill(~tril, torch.finfo(torch.float32).min)
    padded = additive.clone()
    padded[..., 3, 1] = float("-inf")  # causal AND padding: not a pure causal mask
    assert ops.is_causal_mask(additive, S, L) and ops.is_causal_mask(tril, S, L)
    assert ops.is_causal_mask(additive.expand(2, 1, S, L).contiguous(), S, L)  # per-batch copies of it
    assert not ops.is_causal_mask(padded, S, L) and not ops.is_causal_mask(torch.cat([additive, padded]), S, L)
    for mask in (additive, tril, padded):
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
        got = torch.ops.fusion.attention(q, k, v, mask, 0.3, False)
        assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_the_measured_rates_decide_between_attention_and_bmm_softmax_bmm():
    """Whether one attention call beats bmm + softmax + bmm is the cost model's call, from the measured
    per-call rates of both (calibrate._attention_curves): at S=1024 with rates like this machine's
    (bmm ~0.5x the square-GEMM rate, SDPA's blocked kernel at it) attention wins; were SDPA 10x slower
    than the products, the unfused form would stay."""
    import dataclasses

    from fusion.extract.pricing import DEFAULT_PROFILE as base
    from fusion.costmodel.hardware import ATTENTION_KEY, BMM_KEY

    rates = lambda bmm, attn: dataclasses.replace(   # noqa: E731
        base, gemm_flops={**base.gemm_flops, BMM_KEY: bmm, ATTENTION_KEY: attn},
        gemm_curve={k: v for k, v in base.gemm_curve.items() if k not in (BMM_KEY, ATTENTION_KEY)})
    fn = lambda q, k, v, m: torch.softmax(q @ k.transpose(-1, -2) * 0.125 + m, -1) @ v   # noqa: E731
    q, k, v = qkv(1, 2, 1024, 1024, 64)
    m = torch.randn(1, 1, 1, 1024)
    gm, args = capture(Attn(fn), q, k, v, m)
    fast = rewrite(gm, Config(), rates(100e9, 250e9))
    slow = rewrite(gm, Config(), rates(100e9, 10e9))
    assert n_attn(fast) == 1 and n_attn(slow) == 0
    with torch.no_grad():
        assert rel_err(fast.gm(*args)[0], fn(q, k, v, m)) <= 2e-5


def test_symbolic_sizes_that_are_no_polynomial_stay_out_of_the_e_graph():
    """Regression: `repeat_interleave(h // hkv, dim=1)` under dynamic=True expands by `FloorDiv(s1, s0)`. Its value
    at the symbols' stand-ins is a small plain int (1 here), so the expand read as a no-op and the rewritten
    graph viewed 2x too few elements. A size that is not a polynomial of the symbols is no e-graph literal."""
    from fusion.dialect.values import size_id

    def gqa(q, k, v):
        n = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v

    torch._dynamo.reset()
    compiled = torch.compile(gqa, backend="fusion", dynamic=True)
    for length in (32, 33):                       # batch 2 == kv heads 2: Dynamo gives them one symbol
        q, k, v = qkv(2, 4, length, length, 16, hkv=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FusionFallbackWarning)
            out = compiled(q, k, v)
        assert rel_err(out, gqa(q, k, v)) <= 2e-5
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv()
    h, hkv = (env.create_symintnode(env.create_symbol(n, ConstantSource(f"d{n}"), dynamic_dim=DimDynamic.DYNAMIC),
                                    hint=n) for n in (4, 2))
    assert size_id(h // hkv) is None                             # FloorDiv: no e-graph literal
    assert size_id(h * hkv) == size_id(h) * size_id(hkv) and size_id(h + 1) == size_id(h) + 1


class NanoGptCausal(nn.Module):
    """nanoGPT's causal attention: a tril buffer and `masked_fill(bias[:, :, :T, :T] == 0, -inf)`."""
    def __init__(self, n: int = 64):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(n, n)).view(1, 1, n, n))

    def forward(self, q, k, v):
        t = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        return torch.softmax(att, dim=-1) @ v


def _padding_additive(q, k, v, keep):
    mask = (1.0 - keep[:, None, None, :]) * torch.finfo(q.dtype).min    # an integral float beyond int64
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.size(-1)) + mask, -1) @ v


@pytest.mark.parametrize("name", ["nanogpt_masked_fill", "padding_additive_finfo_min", "masked_fill_runtime_tril"])
def test_masks_under_torch_compile_reach_the_attention_rule(name):
    """AOTAutograd keeps `masked_fill` (export decomposes it to `where`): normalize writes it as the `where` the
    rules read. The graph torch.compile captured, rewritten, holds one attention call, and the compiled model
    equals eager with no fallback (a `finfo.min` scalar used to fail the rebuild as an over-long int)."""
    import fusion

    q, k, v = qkv(2, 2, 24, 24, 16)
    keep = torch.ones(2, 24)
    keep[1, -5:] = 0
    fn, inputs = {
        "nanogpt_masked_fill": (NanoGptCausal(), (q, k, v)),
        "padding_additive_finfo_min": (Attn(_padding_additive), (q, k, v, keep)),
        "masked_fill_runtime_tril": (Attn(lambda q, k, v: torch.softmax((q @ k.transpose(-1, -2) * 0.25).masked_fill(
            ~torch.ones(q.size(-2), q.size(-2), dtype=torch.bool).tril(), float("-inf")), -1) @ v), (q, k, v)),
    }[name]
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusionFallbackWarning)
        out = torch.compile(fn, backend="fusion")(*inputs)
    assert rel_err(out, fn(*inputs)) <= 2e-5
    source = fusion.last_compiled(1)[0].source_gm
    assert n_attn(rewrite(source, Config())) == 1, source.code
