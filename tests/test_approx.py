"""fusion.approx: approximate rewrites are opt-in, within their expected error, guarded, and convert weights
in place without holding two copies."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import fusion
from fusion.approx import apply_approximations, bind, optimize_approx, output_errors
from fusion.approx.rules import find_sites
from fusion.capture import capture_module

from .approx_models import Block, ReluRef
from .conftest import rel_err


def _run(model, x, kinds, tol=0.99):
    torch.manual_seed(0)
    with torch.no_grad():
        ref = model(x)
    opt = optimize_approx(model, (x,), fusion.Config(approximate=kinds, tolerance=tol))
    with torch.no_grad():
        out = opt(x)
    return opt, out, ref


@pytest.fixture
def block():
    torch.manual_seed(0)
    return Block().eval()


def test_exact_mode_applies_nothing(block):
    x = torch.randn(4, 16, 64)
    cap = capture_module(block, (x,))
    weights, flat = bind(block, cap, (x,))
    before = {k: (v.dtype, v.data_ptr()) for k, v in weights.items()}
    res = apply_approximations(cap.gm, fusion.Config(), weights, flat)
    assert res.gm is cap.gm and res.sites == [] and res.final_error == 0.0
    assert {k: (v.dtype, v.data_ptr()) for k, v in weights.items()} == before
    assert fusion.Config().approximate == frozenset()
    # each rule only when named
    assert {s.kind for s in find_sites(cap.gm, weights, frozenset({"relu_attention"}))} == {"relu_attention"}
    int8 = find_sites(cap.gm, weights, frozenset({"int8"}))   # the form that starts is timed per shape
    assert len(int8) == 6 and {s.kind for s in int8} <= {"int8", "int8_weight_only"}
    assert all("measured on this shape" in s.note for s in int8)
    assert {s.kind for s in find_sites(cap.gm, weights, frozenset({"bf16"}))} == {"bf16"}
    assert find_sites(cap.gm, weights, frozenset()) == []


def test_int8_w8a8(block, w8a8_first):
    x = torch.randn(4, 32, 64)  # 128 rows
    opt, out, ref = _run(block, x, {"int8"})
    kinds = [s.kind for s in opt.result.sites]
    assert kinds.count("int8") == 6 and not any(s.reverted for s in opt.result.sites)
    assert all(s.name.startswith("int8:") for s in opt.result.sites)
    assert rel_err(out, ref) < 3e-2
    assert output_errors(out, ref)[1] > 0.999
    assert block.q.weight.dtype == torch.int8          # converted in place, by name
    code = opt.gm.code
    assert "quantize_weight_int8" not in code and "_approx_scale_" in code
    # q, k, v quantize x once; o and up quantize their inputs; down's input is quantized by up's epilogue
    # (bias + GELU + per-token quantization in one pass: the fp32 GELU output is never written)
    assert code.count("fusion.quantize_rows.default(") == 3
    assert code.count("fusion.int8_matmul_quant.default(") == 1 and "'gelu'" in code
    assert code.count("fusion.int8_matmul.default(") == 5 and "aten.gelu" not in code


@pytest.mark.parametrize("act", ["none", "gelu", "gelu_tanh"])
def test_int8_kernels_match_aten(act, monkeypatch):
    """The one-pass C++ quantization / epilogue kernels compute what the ATen formulation does."""
    from fusion.approx import kernels
    from fusion.approx import ops as O

    if not kernels.available():
        pytest.skip("no C++ compiler")
    torch.manual_seed(0)
    x = torch.randn(3, 37, 96) * torch.linspace(0.1, 8, 96)   # rows of very different ranges
    w, b = torch.randn(80, 96), torch.randn(80)
    wq, ws = O._quantize_weight(w, False)
    q, s = O.quantize_rows(x)
    assert q.shape == (111, 96) and s.shape == (111,) and q.dtype == torch.int8
    x2 = x.reshape(-1, 96)
    assert torch.allclose(s, x2.abs().amax(1) / 127)                      # per-token scales
    assert (q.float() * s[:, None] - x2).abs().max() <= s.max() / 2 * 1.001  # round to nearest
    y = O.int8_matmul(q, s, wq, ws, b, False, act)
    yq = O.int8_matmul_quant(q, s, wq, ws, b, False, act)
    monkeypatch.setattr(kernels, "available", lambda: False)              # the ATen formulation
    q_ref, s_ref = O.quantize_rows(x)
    assert torch.equal(q, q_ref) and torch.allclose(s, s_ref)
    y_ref = O.int8_matmul(q, s, wq, ws, b, False, act)
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-4)
    q2, s2 = O.int8_matmul_quant(q, s, wq, ws, b, False, act)
    assert torch.allclose(yq[1], s2, rtol=1e-5) and (yq[0].int() - q2.int()).abs().max() <= 1
    acc = torch._int_mm(q, wq.t())                                        # int8 x int8 -> int32
    plain = acc.double() * s[:, None].double() * ws.double() + b.double()
    want = plain if act == "none" else torch.nn.functional.gelu(plain, approximate="tanh" if act == "gelu_tanh" else "none")
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-4)


def test_int8_form_is_chosen_by_measured_time():
    from fusion.approx.cost import int8_ladder

    ladder, t = int8_ladder(512, 256, 256)
    assert set(t) == {"int8", "int8_weight_only", "fp32"} and all(v > 0 for v in t.values())
    assert ladder == (("int8", "int8_weight_only") if t["int8"] <= t["int8_weight_only"] else ("int8_weight_only",))


def test_int8_guard_ladder_and_tiny_tolerance_reverts_everything(block, w8a8_first):
    x = torch.randn(4, 32, 64)
    w_before = block.q.weight.detach().clone()
    opt, out, ref = _run(block, x, {"int8"}, tol=1e-7)
    names = [s.name for s in opt.result.sites]
    # every linear went W8A8 -> weight-only -> exact
    assert sum(n.startswith("int8:") for n in names) == 6
    assert sum(n.startswith("int8_weight_only:") for n in names) == 6
    assert all(s.reverted for s in opt.result.sites)
    assert torch.equal(out, ref) and opt.result.final_error == 0.0
    assert torch.equal(block.q.weight, w_before)               # nothing converted


def test_int8_weight_only(block, monkeypatch):
    import fusion.approx.rules as rules

    monkeypatch.setattr(rules, "INT8_LADDER", ("int8_weight_only",))   # normally only the guard's fallback for W8A8
    x = torch.randn(1, 8, 64)
    opt, out, ref = _run(block, x, {"int8"})
    assert {s.kind for s in opt.result.sites} == {"int8_weight_only"}
    assert rel_err(out, ref) < 2e-2
    assert "int8_weight_only_linear" in opt.gm.code and block.up.weight.dtype == torch.int8


def test_bf16(block):
    x = torch.randn(2, 32, 64)
    opt, out, ref = _run(block, x, {"bf16"})
    assert {s.kind for s in opt.result.sites} == {"bf16"}
    assert rel_err(out, ref) < 2e-2
    assert output_errors(out, ref)[1] > 0.9999
    assert block.up.weight.dtype == torch.bfloat16 and out.dtype == torch.float32
    code = opt.gm.code
    # one bf16 cast of x for q, k, v; GELU in up's epilogue, which stores bf16 for down (no cast left for it)
    assert code.count("fusion.bf16_linear.default(") == 6 and "aten.gelu" not in code
    assert code.count("dtype = torch.bfloat16") == 3 and "'gelu', True)" in code


def test_relu_attention_matches_relu_trained_semantics(block):
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        want = ReluRef(block)(x)
    opt, out, ref = _run(block, x, {"relu_attention"})
    (site,) = opt.result.sites
    assert site.kind == "relu_attention" and not site.reverted
    assert "trained" in site.note.lower()
    assert rel_err(out, want) < 1e-5          # it computes exactly ReLU attention...
    assert rel_err(out, ref) > 1e-3           # ...which is not the softmax model's function


def test_guard_reverts_harmful_site(block):
    x = torch.randn(2, 32, 64)
    opt, out, ref = _run(block, x, {"relu_attention", "bf16"}, tol=2e-2)
    res = opt.result
    relu = [s for s in res.sites if s.kind == "relu_attention"]
    bf16 = [s for s in res.sites if s.kind == "bf16"]
    assert relu and all(s.reverted for s in relu)           # the harmful site, reverted first
    assert bf16 and not any(s.reverted for s in bf16)       # the harmless ones stay
    assert res.exact_error > 2e-2 >= res.final_error
    assert rel_err(out, ref) <= 2e-2
    assert all(s.error is not None for s in res.sites) and relu[0].output_error > max(s.output_error for s in bf16)


_MEMORY_SCRIPT = textwrap.dedent("""
    import gc, sys, torch, torch.nn as nn
    sys.path.insert(0, {root!r})
    import fusion
    from fusion.approx import apply_approximations, bind
    from fusion.capture import capture_module
    torch.manual_seed(0)
    # warm up once on a tiny model (oneDNN primitives, compiled kernels, fake-tensor caches: not weights)
    tiny = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).eval(); tx = torch.randn(64, 64)
    tcap = capture_module(tiny, (tx,)); tw, tf = bind(tiny, tcap, (tx,))
    (
        apply_approximations(tcap.gm, fusion.Config(approximate={{"int8"}}, tolerance=0.5), tw, tf).gm(*tf))
    L, D = 16, 4096                       # 16 layers x 4096x4096 fp32 = 64 MiB each, 1 GiB in all
    model = nn.Sequential(*[nn.Linear(D, D, bias=False) for _ in range(L)]).eval()
    x = torch.randn(32, D)
    cap = capture_module(model, (x,))
    weights, flat = bind(model, cap, (x,))
    with torch.no_grad():
        model(x)
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")   # reset the peak-RSS watermark
    base = rss("VmRSS:")
    res = apply_approximations(cap.gm, fusion.Config(approximate={{"int8"}}, tolerance=0.5), weights, flat)
    peak = rss("VmHWM:")
    gc.collect()
    after = rss("VmRSS:")
    layer = D * D * 4
    print(base, peak, after, layer, L * layer, sum(not s.reverted for s in res.sites))
""")


@pytest.mark.slow
def test_int8_conversion_peak_memory_is_weights_plus_one_layer():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT.format(root=root)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    base, peak, after, layer, total, kept = map(int, out.stdout.split()[-6:])
    assert kept == 16
    # never both full copies: fp32 weights (in base) + at most one layer. Keeping both copies would add 16 x 16 MiB
    # of int8 = 4 fp32 layers' worth on top of the fp32 weights. What is live at the peak is one layer's int8
    # copy (1/4 layer, made by the one-pass quantization kernel: no fp32 temporaries); measured 0.3-0.8 layer of
    # RSS, the rest being freed blocks glibc keeps for reuse (its trim threshold).
    assert peak - base <= layer, (peak - base) / layer
    # the fp32 originals were freed: 3/4 of the weight bytes are gone
    assert base - after >= 0.6 * total, (base - after) / total


def test_public_api_runs_the_approximate_stage_and_explains_it():
    """fusion.optimize(config=Config(approximate=...)) runs the guarded pass between rewrite and lower."""
    import fusion
    from tests.test_api import Block

    torch.manual_seed(0)
    ref_model = Block(d=64).eval()
    x = torch.randn(4, 32, 64)
    ref = ref_model(x).detach()
    model = Block(d=64).eval()
    model.load_state_dict(ref_model.state_dict())
    opt = fusion.optimize(model, (x,), config=fusion.Config(approximate={"bf16"}, tolerance=0.05))
    passes = [p.name for p in opt.graphs[0].log.passes]
    assert passes[:7] == ["normalize", "rewrite", "approximate", "layout", "prepare", "lower", "build"], passes  # (+ later)
    err = ((opt(x) - ref).abs().max() / ref.abs().max()).item()
    assert 0 < err <= 0.05  # changed (bf16 is not exact) but within tolerance
    assert "approximate rewrites" in opt.explain()
    exact = fusion.optimize(ref_model, (x,), config=fusion.Config(structural_cache=False))  # passes, not a cache hit
    names = [p.name for p in exact.graphs[0].log.passes]
    assert "approximate" not in names and names[:2] == ["normalize", "rewrite"] and "lower" in names, names


def test_int8_with_bf16_falls_back_to_bf16(block, w8a8_first):
    x = torch.randn(4, 32, 64)
    opt, out, ref = _run(block, x, {"int8", "bf16"}, tol=1e-7)   # nothing can stay: every rung is tried
    names = [s.name.split(":")[0] for s in opt.result.sites]
    assert names.count("int8") == 6 and names.count("bf16") == 6 and "int8_weight_only" not in names
    assert all(s.reverted for s in opt.result.sites) and torch.equal(out, ref)


class SdpaBlock(nn.Module):
    """Attention through F.scaled_dot_product_attention (captured whole as fusion.attention), grouped-query,
    with a padding mask or causal; `relu=True` runs the ReLU-attention reference by hand."""

    def __init__(self, d=64, heads=4, kv_heads=2, causal=False):
        super().__init__()
        self.h, self.hkv, self.causal = heads, kv_heads, causal
        self.q, self.o = nn.Linear(d, d), nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d * kv_heads // heads)

    def forward(self, x, keep, relu: bool = False):
        b, t, d = x.shape
        hd = d // self.h
        q = self.q(x).view(b, t, self.h, hd).transpose(1, 2)
        k, v = (y.view(b, t, self.hkv, hd).transpose(1, 2) for y in self.kv(x).chunk(2, -1))
        mask = None if self.causal else keep[:, None, None, :]
        if relu:
            k, v = (y.repeat_interleave(self.h // self.hkv, 1) for y in (k, v))
            s = q @ k.transpose(-1, -2) / math.sqrt(hd)
            drop = ~torch.ones(t, t, dtype=torch.bool).tril() if self.causal else ~mask
            a = (torch.relu(s.masked_fill(drop, float("-inf"))) / t) @ v
        else:
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal,
                                                                 enable_gqa=True)
        return self.o(a.transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("causal", [False, True])
def test_relu_attention_on_fused_sdpa_attention(causal):
    torch.manual_seed(0)
    m = SdpaBlock(causal=causal).eval()
    x, keep = torch.randn(2, 12, 64), torch.ones(2, 12, dtype=torch.bool)
    keep[1, 9:] = False                                     # padding in the second sequence
    with torch.no_grad():
        want, ref = m(x, keep, relu=True), m(x, keep)
    opt = optimize_approx(m, (x, keep), fusion.Config(approximate={"relu_attention"}, tolerance=0.99))
    (site,) = opt.result.sites
    assert site.kind == "relu_attention" and not site.reverted and "fused attention" in site.note
    with torch.no_grad():
        out = opt(x, keep)
    assert rel_err(out, want) < 1e-5 and rel_err(out, ref) > 1e-3


def test_saving_an_approximate_program_says_why_not(block, tmp_path):
    x = torch.randn(2, 16, 64)
    opt = fusion.optimize(block, (x,), config=fusion.Config(approximate={"int8"}, tolerance=0.99))
    with pytest.raises(fusion.FusionInputError, match="approximate"):
        opt.save(tmp_path / "p")


# ------------------------------------------------------------------------------------------------------------
# bf16 buffers in generated C++ kernels (approximate "bf16" mode): loads widen, arithmetic in fp32, stores round


def _bf16_ulps(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |out - ref| in units of ref's bf16 spacing (NaNs must match)."""
    o, r = out.float(), ref.float()
    assert torch.equal(o.isnan(), r.isnan())
    fin = r.isfinite()
    assert torch.equal(o[~fin & ~r.isnan()], r[~fin & ~r.isnan()])
    o, r = o[fin], r[fin]
    _, e = torch.frexp(r.abs().clamp_min(torch.finfo(torch.bfloat16).tiny))
    return ((o - r).abs() / torch.ldexp(torch.ones_like(r), e - 8)).max().item() if r.numel() else 0.0


def _lower_bf16(f, args, approximate=frozenset({"bf16"})):
    from fusion.pipeline import lower_to_kernels
    from tests.test_codegen import export

    return lower_to_kernels(export(f, args), fusion.Config(approximate=approximate))


_BF16 = torch.bfloat16


@pytest.mark.parametrize("case", ["layer_norm", "add_bias_residual_layer_norm_and_cast", "softmax", "gelu",
                                  "mixed_pointwise"])
def test_bf16_kernel_io_matches_eager_bf16(case):
    """Kernels reading / writing bf16 compute what eager bf16 PyTorch does, within one bf16 ulp (both compute in
    fp32 and round; the fp32 operation orders differ)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    d = 384
    cases = {
        "layer_norm": (lambda x, w, b: F.layer_norm(x, (d,), w, b),
                       (torch.randn(64, d).to(_BF16), torch.randn(d).to(_BF16), torch.randn(d).to(_BF16))),
        # the bf16 GEMM result + fp32 bias + fp32 residual -> layer norm, written fp32 and as the next GEMM's bf16
        "add_bias_residual_layer_norm_and_cast": (
            lambda y, bias, r, w, b: (lambda h: (h, h.to(_BF16)))(F.layer_norm(y + bias + r, (d,), w, b)),
            (torch.randn(4, 16, d).to(_BF16), torch.randn(d), torch.randn(4, 16, d), torch.randn(d), torch.randn(d))),
        "softmax": (lambda s: torch.softmax(s * 0.125, -1), (torch.randn(2, 4, 64, 64).to(_BF16) * 8,)),
        # |x| <= 4: further out, 1 + erf(x / sqrt 2) cancels and the fp32 erf implementations (glibc's vector
        # erff, ATen's) differ by more than bf16 rounding (e.g. gelu(-5.25): -0 vs -4.7e-7), in exact mode too
        "gelu": (lambda x: F.gelu(x), ((torch.randn(64, 1536) * 2).clamp(-4, 4).to(_BF16),)),
        "mixed_pointwise": (lambda x, y: ((x * 3 + y).to(_BF16), (x.to(_BF16) * 3).float() + y),
                            (torch.randn(33, 77), torch.randn(33, 77).to(_BF16))),
    }
    f, args = cases[case]
    res = _lower_bf16(f, args)
    assert res.kernels, res.gm.code
    specs = [m.spec for _, m in res.gm.named_children() if hasattr(m, "spec")]
    assert any(dt == _BF16 for s in specs for _, dt in s.outputs) or any(a.dtype == _BF16 for a in args)
    outs, refs = res.gm(*args), f(*args)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    refs = refs if isinstance(refs, (tuple, list)) else (refs,)
    for o, r in zip(outs, refs):
        assert o.dtype == r.dtype and o.shape == r.shape
        if r.dtype == _BF16:
            assert _bf16_ulps(o, r) <= 1.0
        else:
            assert rel_err(o, r) < 1e-5


def test_bf16_store_rounds_to_nearest_even_like_torch():
    """The kernel's fp32 -> bf16 store is bit-identical to torch's: ties to even, +-inf, +-0, overflow,
    subnormals (NaN stays NaN); bf16 loads are exact."""
    base = torch.tensor([1.0, -1.0, 0.0, -0.0, float("inf"), float("-inf"), float("nan"), 3.4e38, -3.4e38,
                         1e-40, -1e-40, 65504.0, 1.00390625, 1.01171875, 1.005859375, 3.0e-39])
    ties = (torch.arange(1, 200, dtype=torch.float32) * 2 ** -8 + 1)       # exactly half-way between bf16s
    x = torch.cat([base, ties, -ties, torch.randn(20000) * torch.logspace(-30, 30, 20000)]).reshape(1, -1)
    res = _lower_bf16(lambda t: (t * 1.0).to(_BF16), (x,))   # (a kernel: at least 16384 elements)
    assert res.kernels
    (out,) = res.gm(x)
    want = x.to(_BF16)
    nan = want.isnan()   # NaN stays NaN (its payload differs between ATen's scalar and vector conversions)
    assert torch.equal(out.isnan(), nan) and nan.any()
    assert torch.equal(out[~nan].view(torch.int16), want[~nan].view(torch.int16))
    y = x.to(_BF16)
    back = _lower_bf16(lambda t: t.float() * 1.0, (y,))
    assert back.kernels and torch.equal(back.gm(y)[0].view(torch.int32), y.float().view(torch.int32))   # bits


def test_exact_mode_never_makes_a_bf16_buffer():
    """Without approximate "bf16" no generated kernel reads or writes bf16, even where the graph casts to bf16;
    and an exact fp32 model's optimized program holds no bf16 tensor at all."""
    import torch.nn.functional as F

    x = torch.randn(4, 16, 64)
    res = _lower_bf16(lambda t, w: F.layer_norm(t, (64,), w).to(_BF16).float() + t, (x, torch.randn(64)),
                      approximate=frozenset())
    specs = [m.spec for _, m in res.gm.named_children() if hasattr(m, "spec")]
    assert specs and not any(dt == _BF16 for s in specs for _, dt in s.outputs)
    assert res.kernels and all("uint16_t* __restrict" not in open(k.source_path).read() for k in res.kernels)
    torch.manual_seed(0)
    opt = fusion.optimize(Block().eval(), (x,), config=fusion.Config(structural_cache=False))
    gm = opt.graphs[0].gm
    assert "bfloat16" not in gm.code
    assert not any(dt == _BF16 for _, m in gm.named_children() if hasattr(m, "spec") for _, dt in m.spec.outputs)
    assert not any(isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dtype == _BF16
                   for n in gm.graph.nodes)


def test_bf16_mode_activations_cross_kernels_in_bf16(block):
    """In the bf16 mode the output projection's and the FFN down-projection's bf16 GEMM results go straight into
    the residual-add + layer-norm kernel (the bias add with them: no epilogue pass), which also writes the next
    GEMM's bf16 input; the residual stream stays fp32. Same values as the unlowered approximate program."""
    x = torch.randn(4, 32, 64)
    with torch.no_grad():
        ref = block(x)
    opt = fusion.optimize(block, (x,), config=fusion.Config(approximate={"bf16"}, tolerance=0.05,
                                                            structural_cache=False))
    g = opt.graphs[0]
    code = g.gm.code
    assert code.count("'none', True)") == 2                     # o and down: the raw bf16 GEMM result
    kernels = {n: m for n, m in g.gm.named_children() if hasattr(m, "spec")}
    reads_bf16 = [k for k in g.log.kernels if "uint16_t* __restrict in" in open(k.source_path).read()]
    assert reads_bf16
    assert any(dt == _BF16 for m in kernels.values() for _, dt in m.spec.outputs)   # the LN writes bf16 too
    with torch.no_grad():
        out, unlowered = opt(x), g.program_gm(*opt.flat_args(x))
    unlowered = unlowered[0] if isinstance(unlowered, (tuple, list)) else unlowered
    # (not bit-equal: the generated kernels sum in another fp32 order, and a 1-ulp change can flip a later
    # bf16 rounding; on MiniLM old and new lowerings differ from the unlowered program alike, 7e-4 at most)
    assert out.dtype == torch.float32 and rel_err(out, unlowered) < 2e-3
    assert rel_err(out, ref) < 2e-2 and output_errors(out, ref)[1] > 0.9999
