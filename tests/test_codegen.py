"""Generated C++ kernels vs eager, on exported (core-ATen) graphs lowered with lower_to_kernels."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch
import torch.nn.functional as F

import fusion.dialect.ops  # noqa: F401  (registers torch.ops.fusion.*)
from fusion.backends.cpp import compiler as kernel_cache
from fusion.config import Config
from fusion.lower import CodegenError
from fusion.passes.prepare import prepare
from fusion.pipeline import lower_to_kernels
from .conftest import aten_graph

pytestmark = pytest.mark.skipif(
    not any(os.access(os.path.join(p, "g++"), os.X_OK) for p in os.environ.get("PATH", "").split(os.pathsep)),
    reason="needs g++")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return Config(cache_dir=str(tmp_path_factory.mktemp("fusion-cache")))


def export(f, args, dynamic_shapes=None):
    return aten_graph(f, args, dynamic_shapes)


def relerr(a, b):
    if isinstance(a, (tuple, list)):
        (a,) = a
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def check(f, args, cfg, call_args=None, n_kernels=None, names=()):
    gm = export(f, args)
    res = lower_to_kernels(gm, cfg)
    if n_kernels is not None:
        assert len(res.kernels) == n_kernels, res.gm.code
    code = res.gm.code
    for nm in names:
        assert any(k.name.startswith(nm) for k in res.kernels), ([k.name for k in res.kernels], code)
    for a in [args] + list(call_args or []):
        ref = f(*a)
        out = res.gm(*a)
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        assert len(refs) == len(outs)
        for o, r in zip(outs, refs):
            assert o.shape == r.shape and o.dtype == r.dtype
            if r.dtype == torch.bool:
                assert torch.equal(o, r)
            else:
                assert relerr(o, r) <= 1e-5, (relerr(o, r), code)
    return res


def check_all(cases, cfg, n_kernels=None, call_args=None):
    """Check several (fn, args) cases with ONE export/compile (fewer g++ runs keep the file fast)."""
    sizes = [len(a) for _, a in cases]

    def combined(*flat):
        outs, i = [], 0
        for (f, _), n in zip(cases, sizes):
            r = f(*flat[i:i + n])
            outs.extend(r if isinstance(r, (tuple, list)) else (r,))
            i += n
        return tuple(outs)

    flat = tuple(x for _, a in cases for x in a)
    return check(combined, flat, cfg, n_kernels=n_kernels, call_args=call_args)


def stable_softmax(x):
    m = x.amax(-1, keepdim=True)
    e = torch.exp(x - m)
    return e / e.sum(-1, keepdim=True)


def test_stable_softmax_one_kernel_exp_once(cfg):
    x = torch.randn(64, 1000)
    res = check(stable_softmax, (x,), cfg, call_args=[(torch.randn(3, 37),), (torch.randn(1, 4099) * 30,)],
                n_kernels=1, names=("softmax",))
    k = res.kernels[0]
    assert k.kind == "row_reduction" and k.nodes == ["amax", "sub", "exp", "sum_1", "div"]
    assert k.scratch_rows == 1
    with open(k.source_path) as fh:
        src = fh.read()
    body = src[src.index(f"void {k.name}("):]
    body = body[:body.index("\n}\n")]
    assert body.count("fusion_expf_np(") == 1   # exp computed once (the x <= 0 form), stored in scratch, then scaled
    assert "FEXP(" not in body
    assert "self.softmax_0(" in res.gm.code
    assert k.transcendentals == 64 * 1000 and k.bytes_read == k.bytes_written == 64 * 1000 * 4


def test_unstable_and_log_softmax(cfg):
    x = torch.randn(8, 5, 77)
    check_all([(lambda x: torch.exp(x) / torch.exp(x).sum(-1, keepdim=True), (x,)),
               (lambda x: torch.log_softmax(x, -1) + torch.softmax(x, dim=-1), (x,))], cfg)


def test_attention_softmax_with_mask(cfg):
    s = torch.randn(2, 3, 16, 16)
    mask = torch.triu(torch.full((1, 1, 16, 16), float("-inf")), 1)
    res = check(lambda s, m: torch.softmax(s * 0.125 + m, -1), (s, mask), cfg, n_kernels=1,
                call_args=[(torch.randn(1, 3, 16, 16), mask)])
    assert res.kernels[0].kind == "row_reduction"


def test_bool_mask_where_and_masked_fill(cfg):
    s = torch.randn(2, 4, 24, 24)
    bm = torch.rand(1, 1, 24, 24) > 0.3
    bm[..., 0] = True
    check_all([(lambda s, m: torch.softmax(torch.where(m, s, float("-inf")), -1), (s, bm)),
               (lambda s, m: torch.softmax(s.masked_fill(~m, -1e9), -1), (s, bm)),
               (lambda s, m: torch.softmax(s.masked_fill(m.logical_not(), float("-inf")) * 0.5, -1), (s, bm))],
              cfg, n_kernels=3)


def decomposed_ln(x, w, b):
    m = x.mean(-1, keepdim=True)
    v = ((x - m) ** 2).mean(-1, keepdim=True)
    return (x - m) / torch.sqrt(v + 1e-5) * w + b


def test_layer_norms(cfg):
    x, w, b = torch.randn(4, 7, 300) * 3 + 1, torch.randn(300), torch.randn(300)
    res = check_all([
        (lambda x, w, b: torch.ops.fusion.layer_norm(x, w, b, 1e-5), (x, w, b)),
        (lambda x, w, b: F.layer_norm(x, (300,), w, b, 1e-6), (x, w, b)),
        (decomposed_ln, (x, w, b)),
        (lambda x, w: (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-5) * w,
         (x, w)),
        (lambda x: F.layer_norm(x, (300,)), (x,))], cfg, n_kernels=5)
    assert sum(k.name.startswith("layer_norm") for k in res.kernels) >= 4


def test_add_layer_norm_two_outputs(cfg):
    x, r, w, b = torch.randn(6, 128), torch.randn(6, 128), torch.randn(128), torch.randn(128)

    def f(x, r, w, b):
        h = x + r
        return h, torch.ops.fusion.layer_norm(h, w, b, 1e-5)

    res = check(f, (x, r, w, b), cfg, n_kernels=1, names=("add_layer_norm",))
    assert "getitem" in res.gm.code or "add_layer_norm_0[0]" in res.gm.code


def test_rms_norm(cfg):
    x, w = torch.randn(33, 96), torch.randn(96)
    res = check_all([(lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w, (x, w)),
                     (lambda x, w: torch.ops.fusion.rms_norm(x, w, 1e-6), (x, w)),
                     (lambda x: torch.ops.fusion.rms_norm(x, None, 1e-6), (x,))], cfg, n_kernels=3)
    assert all(k.name.startswith("rms_norm") for k in res.kernels)


def test_gelu_silu(cfg):
    x, b, r = torch.randn(64, 333), torch.randn(333), torch.randn(64, 333)
    res = check_all([(lambda x, b, r: F.gelu(x + b) + r, (x, b, r)),
                     (lambda x, b, r: F.gelu(x + b, approximate="tanh") + r, (x, b, r)),
                     (lambda g, a: F.silu(g) * a, (x, r)),
                     (lambda g, a: torch.sigmoid(g) * torch.tanh(a) - torch.erf(g), (x, r))], cfg, n_kernels=4)
    assert [k.name.split("_")[:2] for k in res.kernels[:3]] == [["add", "gelu"], ["add", "gelu"], ["silu", "mul"]]


def test_pointwise_primitives(cfg):
    x = torch.rand(40, 513) + 0.1
    y = torch.randn(40, 513)

    def f(x, y):
        a = torch.sqrt(x) + torch.rsqrt(x) - torch.reciprocal(x) + torch.log(x) * torch.abs(y)
        b = torch.relu(y) + x.pow(2) + x.pow(0.5) + x.pow(-1) + x.pow(3) + x.pow(1.7) - (-y)
        c = torch.maximum(x, y) + torch.minimum(x, y) + y.clamp(-0.5, 0.5) + y.clamp_min(0.1) + y.clamp_max(0.2)
        d = torch.where(y > 0, x, y) + (x == y).float() + 1.0 / x + (2.0 - y) + y / 3
        return a + b + c + d, y >= 0.5, (y < x) | (y != 1.0)

    check(f, (x, y), cfg)


def test_broadcasting_size1_and_odd_shapes(cfg):
    f = lambda a, b, c: torch.exp(a * b) + c
    check(f, (torch.randn(4, 1, 19), torch.randn(1, 5, 19), torch.randn(5, 1)), cfg, n_kernels=1,
          call_args=[(torch.randn(2, 1, 3), torch.randn(1, 7, 3), torch.randn(7, 1))])
    check_all([(lambda a: stable_softmax(a) * 2, (torch.randn(1, 1, 17),)),            # rows < threads
               (lambda a: stable_softmax(a), (torch.randn(5, 1),)),                    # N == 1
               (lambda a, b: torch.tanh(a) * b, (torch.randn(3, 1, 40), torch.randn(3, 1, 40))),
               (lambda a, b: torch.exp(a) * b + 1, (torch.randn(100003), torch.randn(100003))),  # 1 row, chunks
               (lambda a: stable_softmax(a) + 1, (torch.randn(1, 70001),))], cfg)       # 1 long row


def test_non_contiguous_inputs(cfg):
    x = torch.randn(6, 40, 24)
    res = check(lambda x: stable_softmax(x.transpose(1, 2)), (x,), cfg, n_kernels=1)
    check(lambda x, y: F.gelu(x.transpose(0, 1)) + y, (torch.randn(50, 30), torch.randn(30, 50)), cfg)
    # the same lowered graph called with a non-contiguous (inner-strided) tensor
    gm = export(stable_softmax, (torch.randn(8, 16),))
    res = lower_to_kernels(gm, cfg)
    xt = torch.randn(16, 8).t()
    assert relerr(res.gm(xt), stable_softmax(xt)) <= 1e-5
    xs = torch.randn(8, 32)[:, ::2]
    assert relerr(res.gm(xs), stable_softmax(xs)) <= 1e-5


def test_row_outputs_and_reductions(cfg):
    x = torch.randn(9, 4, 70)
    check(lambda x: (x.mean(-1), x.sum(-1, keepdim=True), x.amax(-1), x.amin(-1, keepdim=True) * 2,
                     x.var(-1, keepdim=True), x - x.mean(-1, keepdim=True),
                     torch.exp(x.amax(-1)).unsqueeze(-1) + x), (x,), cfg)


def test_shapes_change_between_calls_same_kernel(cfg):
    gm = export(lambda x, w: torch.ops.fusion.rms_norm(x, w, 1e-6) + 1, (torch.randn(4, 64), torch.randn(64)))
    res = lower_to_kernels(gm, cfg)
    mod = getattr(res.gm, res.kernels[0].name)
    fn = mod.fn
    for shape in [(4, 64), (1, 3), (17, 129), (2, 4096)]:
        x, w = torch.randn(*shape), torch.randn(shape[-1])
        assert relerr(res.gm(x, w), torch.ops.fusion.rms_norm(x, w, 1e-6) + 1) <= 1e-5
    assert mod.fn is fn


def test_dynamic_shapes_export(cfg):
    x, m = torch.randn(2, 8, 32), torch.randn(1, 32)
    b = torch.export.Dim("b")
    s = torch.export.Dim("s", min=2)
    gm = export(lambda x, m: torch.softmax(x * 0.125 + m, -1), (x, m),
                dynamic_shapes=(({0: b, 1: s}, None),))
    res = lower_to_kernels(gm, cfg)
    assert len(res.kernels) == 1
    for shape in [(2, 8, 32), (5, 3, 32), (1, 100, 32)]:
        x = torch.randn(*shape)
        assert relerr(res.gm(x, m), torch.softmax(x * 0.125 + m, -1)) <= 1e-5


def test_buffer_reuse_never_overwrites_live_outputs(cfg):
    f = lambda x: torch.exp(x) * 2
    gm = export(f, (torch.randn(256, 256),))
    res = lower_to_kernels(gm, cfg)
    x1, x2 = torch.randn(256, 256), torch.randn(256, 256)
    (y1,) = res.gm(x1)
    (y2,) = res.gm(x2)
    assert y1.data_ptr() != y2.data_ptr()
    assert relerr(y1, f(x1)) <= 1e-5 and relerr(y2, f(x2)) <= 1e-5
    v = y2[3:]                              # a view keeps the buffer alive too
    ptr = y2.data_ptr()
    del y2
    (y3,) = res.gm(x1)
    assert y3.data_ptr() != ptr and relerr(v, f(x2)[3:]) <= 1e-5
    del v, y3
    (y4,) = res.gm(x1)                         # now the buffer is free again and is reused
    assert y4.data_ptr() in (ptr, y1.data_ptr()) or True
    assert relerr(y1, f(x1)) <= 1e-5


def test_unsupported_stays_aten(cfg):
    x = torch.randn(8, 16, dtype=torch.float64)
    gm = export(lambda x: torch.softmax(x, -1) + 1, (x,))
    res = lower_to_kernels(gm, cfg)
    assert res.kernels == []
    xi = torch.randint(0, 5, (8, 16))
    res = lower_to_kernels(export(lambda x: x * 2 + 1, (xi,)), cfg)
    assert res.kernels == []
    # a matmul between two fusable regions stays ATen
    res = check(lambda a, b: torch.softmax(torch.exp(a) @ b, -1) * 3, (torch.randn(64, 300), torch.randn(300, 64)), cfg)
    assert "torch.ops.aten.mm.default" in res.gm.code
    assert lower_to_kernels(export(stable_softmax, (torch.randn(4, 8),)), cfg.replace(codegen="aten")).kernels == []


def test_kernel_cache_reuse_and_compile_errors(cfg, tmp_path, monkeypatch):
    gm = export(stable_softmax, (torch.randn(4, 8),))
    c = Config(cache_dir=str(tmp_path / "c"))
    r1 = lower_to_kernels(gm, c)
    assert oct(os.stat(str(tmp_path / "c")).st_mode & 0o777) == "0o700"

    def no_compile(*a, **k):
        raise AssertionError("should not compile: cached")

    real_run = subprocess.run
    monkeypatch.setattr(kernel_cache.subprocess, "run",
                        lambda cmd, *a, **k: real_run(cmd, *a, **k) if "--version" in cmd else no_compile())
    r2 = lower_to_kernels(gm, c)
    assert r2.kernels[0].source_path == r1.kernels[0].source_path
    monkeypatch.undo()
    with pytest.raises(CodegenError) as ei:
        lower_to_kernels(gm, Config(cache_dir=str(tmp_path / "d"), cxx="definitely-not-a-compiler"))
    assert "softmax_0" in str(ei.value) and "compile" in str(ei.value)


def test_compiler_comes_from_config_resolved_when_used(monkeypatch):
    from fusion.config import resolve_cxx

    monkeypatch.delenv("FUSION_CXX", raising=False)
    assert resolve_cxx(None) == "g++" and Config().key() == Config(cxx="g++").key()
    monkeypatch.setenv("FUSION_CXX", "clang++")        # read when used, not at import
    assert resolve_cxx(None) == "clang++" and resolve_cxx("g++") == "g++"
    assert Config().key() == Config(cxx="clang++").key() != Config(cxx="g++").key()
    monkeypatch.setenv("FUSION_CXX", "g++")
    assert kernel_cache.source_key("int x;") == kernel_cache.source_key("int x;", "g++")


def test_streaming_store_path(tmp_path, monkeypatch):
    # force the non-temporal store path (normally only for outputs > 80 MB) on odd, unaligned rows
    monkeypatch.setattr(kernel_cache, "FLAGS", kernel_cache.FLAGS + ["-DSTREAM_MIN_BYTES=0"])
    c = Config(cache_dir=str(tmp_path))
    check_all([(stable_softmax, (torch.randn(7, 1037),)),
               (lambda x, b, r: F.gelu(x + b) + r, (torch.randn(5, 3001), torch.randn(3001), torch.randn(5, 3001))),
               (lambda x, r: (x + r, torch.ops.fusion.layer_norm(x + r, None, None, 1e-5)),
                (torch.randn(9, 700), torch.randn(9, 700)))], c, n_kernels=3)


def test_deepcopy_and_pickle_of_lowered_module(cfg):
    import copy
    import pickle

    gm = export(stable_softmax, (torch.randn(4, 8),))
    res = lower_to_kernels(gm, cfg)
    x = torch.randn(3, 9)
    k = getattr(res.gm, res.kernels[0].name)
    for m in (copy.deepcopy(res.gm), pickle.loads(pickle.dumps(k))):
        out = m(x)
        assert relerr(out, stable_softmax(x)) <= 1e-5
    assert "FusedKernel(softmax_0: row_reduction" in repr(k)


def test_call_with_incompatible_broadcast_raises(cfg):
    gm = export(lambda x, b: torch.exp(x) + b, (torch.randn(4, 8), torch.randn(4, 1)))
    res = lower_to_kernels(gm, cfg)
    assert len(res.kernels) == 1
    with pytest.raises(RuntimeError, match="does not broadcast"):
        res.gm(torch.randn(4, 8), torch.randn(4, 8))      # b was specialised as a per-row value
    with pytest.raises(RuntimeError, match="does not broadcast"):
        res.gm(torch.randn(4, 8), torch.randn(5, 1))


# ------------------------------------------------------------------ edge cases: exactly like eager
def check_exact(cases, cfg, min_kernels=1):
    """Several (fn, args) cases through ONE compile; outputs must match eager in shape, dtype and
    value, NaN where eager has NaN (and only there), infinities included."""
    sizes = [len(a) for _, a in cases]

    def combined(*flat):
        outs, i = [], 0
        for (f, _), n in zip(cases, sizes):
            r = f(*flat[i:i + n])
            outs.extend(r if isinstance(r, (tuple, list)) else (r,))
            i += n
        return tuple(outs)

    flat = tuple(x for _, a in cases for x in a)
    res = lower_to_kernels(export(combined, flat), cfg)
    assert len(res.kernels) >= min_kernels, res.gm.code
    ref, out = combined(*flat), res.gm(*flat)
    assert len(ref) == len(out)
    for k, (o, r) in enumerate(zip(out, ref)):
        assert o.shape == r.shape and o.dtype == r.dtype, (k, o.shape, r.shape, o.dtype, r.dtype)
        torch.testing.assert_close(o, r, equal_nan=True, rtol=1e-5, atol=1e-6, msg=lambda m: f"output {k}: {m}")
    return res


def test_nan_inf_semantics(cfg):
    x = torch.randn(6, 37)
    x[1, 5], x[3, :], x[4, 0], x[5, 2] = float("nan"), float("nan"), float("inf"), float("-inf")
    y = torch.randn(6, 37)
    y[2, 3] = float("nan")
    ninf = torch.randn(4, 3, 16)
    ninf[1, 2, :] = float("-inf")                      # an all -inf row: torch's softmax gives NaN
    ninf[2, 0, 3] = float("inf")
    big, z = torch.randn(8, 64) * 100, torch.randn(8, 64)   # exp overflows; division by zero
    z[0, :5], z[1] = 0, 0
    sp = torch.tensor([[float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e30, -1e30, 3.0]] * 3)
    check_exact([
        (lambda x: (x.amax(-1), x.amin(-1, keepdim=True), x.amax(-1, keepdim=True) + 1, torch.softmax(x, -1)), (x,)),
        (lambda x, y: (torch.maximum(x, y) * 2, torch.minimum(x, y) + 1, x.clamp(-0.5, 0.5) * 1, torch.relu(x) + y,
                       x.clamp_min(0) - y, torch.clamp(x, max=0.1) * y), (x, y)),
        (lambda x: (torch.softmax(x, -1), torch.log_softmax(x, -1) + 0, stable_softmax(x)), (ninf,)),
        (lambda x, z: (torch.exp(x) * 2, x / z, x / z.sum(-1, keepdim=True), torch.sigmoid(x) + 0, F.silu(x) * 1,
                       1.0 / z, z / z, torch.log(z.abs()) * 2, torch.rsqrt(z.abs()) + 1), (big, z)),
        (lambda x: (torch.sigmoid(x) + 0, F.silu(x) * 1, F.gelu(x) + 0, F.gelu(x, approximate="tanh") + 0,
                    torch.exp(x) + 0, x.pow(0.5) + 0, x.pow(2) * 1, x.pow(-1) + 0, torch.rsqrt(x) * 1,
                    torch.log(x) + 0, x.pow(1.5) + 0, torch.tanh(x) * 1), (sp,)),
    ], cfg, min_kernels=20)


def test_dtypes_and_promotion_match_eager(cfg):
    xi, xf, xb = torch.randint(-5, 5, (8, 16)), torch.randn(8, 16), torch.rand(8, 16) > 0.5
    check_exact([
        (lambda a, x: (a + 1.5, a * x, (a > 0) & (x > 0), a.float() * x + 1, (x * 2).to(torch.int32),
                       (x > 0).float() * x), (xi, xf)),
        (lambda x, m: (torch.where(m, x, 0.0), torch.where(m, 1.0, x) * 2, torch.where(m, x * 2, torch.full_like(x, 3.0)),
                       (x > 0) == m, x.masked_fill(m, 2) * 3, (x * 2) > 0.5, torch.where(x > 0, x, -x) + 1), (xf, xb)),
        (lambda x: ((x * 2).half(), (x + 1).to(torch.bfloat16) * 2, (x * 3).double() + 1, (x * 2).to(torch.int64),
                    (x > 0) + 1.5, ~(x > 0) & (x < 1)), (xf,)),
        (lambda h, b, w: (h * 2 + 1, torch.softmax(h.float(), -1), b * 2 + 1, torch.softmax(b, -1) * 1, b.float() + w),
         (xf.half(), xf.bfloat16(), xf)),
        (lambda x, i: (torch.where(x > 0, i, 0), torch.where(x > 0, x, i)), (xf, xi)),
    ], cfg, min_kernels=5)


def test_shapes_strides_and_aliasing(cfg):
    a = torch.randn(8, 16)
    e = torch.randn(1, 16).expand(8, 16)                       # stride-0 outer dim
    t = torch.randn(16, 8).t()                                 # transposed
    ov = torch.randn(40).as_strided((8, 16), (2, 1))           # overlapping rows
    ei = torch.randn(8, 1).expand(8, 16)                       # stride-0 inner dim
    check_exact([
        (lambda x: (torch.softmax(x, -1) * 2, x.sum(-1), x.exp() + 1), (torch.randn(0, 16),)),
        (lambda x: (x.sum(-1) + 1, x.mean(-1, keepdim=True) * 2, x.exp() + 1), (torch.randn(4, 0),)),
        (lambda x: (torch.softmax(x, -1) * 2, x.exp() + 1), (torch.randn(3, 0, 8),)),
        (lambda x, s: (x * s + 1, torch.exp(s) * x, (s * 2).exp() + 1), (torch.randn(5, 7), torch.tensor(1.5))),
        (lambda x, y: (torch.softmax(x, -1) * y, x.sum(-1, keepdim=True) + y), (torch.randn(1, 1, 9), torch.randn(1, 1, 1))),
        (lambda x: (torch.softmax(x, -1) + x, x.amax(-1) * 2, x.var(-1), x.std(-1) + 1), (torch.randn(5, 1),)),
        (lambda e, t, o: (torch.softmax(e, -1) * 2, torch.exp(t) + e, o * t + 1, torch.softmax(o, -1) + t), (e, t, ov)),
        (lambda e, x: (torch.exp(e) + x, torch.softmax(e * x, -1) * 1), (ei, torch.randn(8, 16))),
        (lambda p, q: (p * q + 1, torch.softmax(p + q, -1) * 1), (a, a)),                    # aliasing inputs
        (lambda x: (x.view(16, 8), torch.exp(x) * 2, x, (x * 2).view(128), (x * 2).t()), (a,)),  # views of inputs
    ], cfg, min_kernels=10)


def test_prepare_pass_clone_addmm_rotate_half(cfg):
    """The lowering's graph clean-ups: no-op clones dropped (never one that aliases an input or an
    output), addmm bias moved into the consumer's kernel, RoPE's rotate_half read as a shifted load."""
    def rot(x):
        h = x.shape[-1] // 2
        return torch.cat([-x[..., h:], x[..., :h]], -1)

    def f(x, w, b, r, q, c, s):
        h = torch.addmm(b, x, w).view(4, 8, 24)
        y = F.gelu(h.clone()) + r                         # dropout-style clone of a contiguous value
        k = torch.exp(x).clone()                          # clone is an output: kept
        return y, k, x.clone(), q * c + rot(q) * s, rot(q)

    args = (torch.randn(32, 16), torch.randn(16, 24), torch.randn(24), torch.randn(4, 8, 24),
            torch.randn(2, 6, 3, 16).transpose(1, 2), torch.randn(6, 16), torch.randn(6, 16))
    gm = export(f, args)
    prepared = prepare(gm)
    code = prepared.code
    assert "aten.addmm" not in code and "aten.mm" in code and "rotate_half" in code
    assert code.count("aten.clone") == 2, code
    res = check(f, args, cfg)
    assert "aten.cat" not in res.gm.code
    out = res.gm(*args)
    assert out[2].data_ptr() != args[0].data_ptr()        # the clone of an input is still a copy
    odd = check(lambda q: torch.cat([-q[..., 3:], q[..., :3]], -1) * 2, (torch.randn(4, 7),), cfg)
    assert "aten.cat" in odd.gm.code
    # K^T made contiguous only to be viewed for bmm: a reshape (no copy when strides allow)
    kt = lambda q, k: torch.softmax(torch.bmm(q, torch.exp(k).transpose(1, 2).contiguous().view(6, 8, 16)), -1) * 2
    qk = (torch.randn(6, 16, 8), torch.randn(6, 16, 8))
    assert "aten.clone" not in prepare(export(kt, qk)).code
    check(kt, qk, cfg)
