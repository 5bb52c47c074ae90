"""The public API: optimize / Config / backend registration / errors / fallbacks / training."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusion
from fusion.errors import FusionFallbackWarning, FusionInputError


class Block(nn.Module):
    """A small pre-LN transformer-style block written by hand (softmax, layer norm, gelu, silu)."""

    def __init__(self, d=32):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.ln(x)
        s = h @ h.transpose(-1, -2) * 0.125
        m = s.amax(-1, keepdim=True)
        e = (s - m).exp()
        a = (e / e.sum(-1, keepdim=True)) @ h
        return x + self.fc2(F.gelu(self.fc1(a))) + F.silu(x)


def test_optimize_matches_eager(assert_close):
    torch.manual_seed(0)
    m = Block().eval()
    x = torch.randn(2, 8, 32)
    opt = fusion.optimize(m, (x,))
    assert_close(opt(x), m(x))
    x2 = torch.randn(3, 8, 32)  # another batch size: sizes are run-time arguments of the kernels
    assert_close(opt(x2), m(x2))
    text = opt.explain()
    assert "passes:" in text and "program:" in text
    assert isinstance(opt.code, str) and "def forward" in opt.code
    rows = opt.report(print_table=False)
    assert isinstance(rows, list)


def test_weights_are_referenced_not_copied():
    m = Block().eval()
    x = torch.randn(2, 8, 32)
    opt = fusion.optimize(m, (x,))
    before = opt(x).clone()
    with torch.no_grad():
        m.fc2.bias.add_(1.0)  # an in-place update is seen by the optimized module
    after = opt(x)
    torch.testing.assert_close(after, before + 1.0, rtol=1e-4, atol=1e-4)


def test_backend_registered_and_config_options(assert_close):
    assert "fusion" in torch._dynamo.list_backends()
    m = Block().eval()
    x = torch.randn(2, 8, 32)
    torch._dynamo.reset()
    cm = torch.compile(m, backend="fusion", options={"max_iterations": 4})
    with torch.no_grad():
        assert_close(cm(x), m(x))


def test_training_step_matches_eager():
    torch.manual_seed(0)
    m = Block()
    x = torch.randn(2, 8, 32)
    ref = Block()
    ref.load_state_dict(m.state_dict())
    torch._dynamo.reset()
    cm = torch.compile(m, backend="fusion")
    loss = cm(x).pow(2).mean()
    loss.backward()
    loss_ref = ref(x).pow(2).mean()
    loss_ref.backward()
    assert abs(loss.item() - loss_ref.item()) <= 1e-4 * abs(loss_ref.item())
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        err = ((p.grad - q.grad).abs().max() / q.grad.abs().max()).item()
        assert err <= 1e-4, f"{name}: grad rel err {err}"


def test_dynamic_shapes(assert_close):
    m = Block().eval()
    torch._dynamo.reset()
    cm = torch.compile(m, backend="fusion", dynamic=True)
    with torch.no_grad():
        for b, s in [(2, 8), (3, 5), (1, 17)]:
            x = torch.randn(b, s, 32)
            assert_close(cm(x), m(x))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: fusion.optimize(lambda x: x, (torch.randn(2),)), "nn.Module"),
        (lambda: fusion.optimize(42, (torch.randn(2),)), "nn.Module"),
        (lambda: fusion.optimize(Block(), (torch.randn(2, 8, 32), torch.randn(2))), "cannot take"),
        (lambda: fusion.optimize(Block(), "x"), "tuple"),
        (lambda: fusion.optimize(Block(), (torch.randn(2, 8, 32),), no_such_option=1), "unknown fusion option"),
        (lambda: fusion.Config(approximate={"int4"}), "unknown approximate"),
        (lambda: fusion.Config(tolerance=5.0), "tolerance"),
        (lambda: fusion.Config(codegen="cuda-graphs"), "codegen"),
    ],
)
def test_bad_input_gets_a_clear_error(call, match):
    with pytest.raises((FusionInputError, fusion.ConfigError)) as info:
        call()
    assert match in str(info.value)


@pytest.mark.parametrize("stage, target", [
    ("rewrite", "fusion.rewrite.rewrite"),
    ("lower", "fusion.lower.plan_kernels"),
])
def test_stage_failure_falls_back_with_one_warning(monkeypatch, tmp_path, stage, target, assert_close):
    import importlib

    mod_name, attr = target.rsplit(".", 1)
    mod = importlib.import_module(mod_name)

    def boom(*a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(mod, attr, boom)
    m = Block().eval()
    x = torch.randn(2, 8, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = fusion.optimize(m, (x,), config=fusion.Config(cache_dir=str(tmp_path)))  # cold cache: every stage runs
        out = opt(x)
    ours = [w for w in caught if issubclass(w.category, FusionFallbackWarning)]
    assert len(ours) == 1 and stage in str(ours[0].message) and "injected failure" in str(ours[0].message)
    assert_close(out, m(x))
    with pytest.raises(RuntimeError, match="injected"):
        fusion.optimize(m, (x,), config=fusion.Config(fallback=False, cache_dir=str(tmp_path / "again")))


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot capture it, Dynamo can
            return torch.softmax(x * 2, -1)
        return x - 1


def test_unexportable_model_is_captured_by_dynamo():
    x = torch.randn(4, 8).abs()
    opt = fusion.optimize(DataDependent(), (x,))
    assert opt.capture_method == "dynamo"
    torch.testing.assert_close(opt(x), DataDependent()(x))
    torch.testing.assert_close(opt(-x), DataDependent()(-x))  # the other branch


def test_capture_failure_falls_back(monkeypatch):
    import fusion.api

    def boom(*a, **k):
        raise RuntimeError("injected capture failure")

    monkeypatch.setattr(fusion.api, "capture_module", boom)
    monkeypatch.setattr(fusion.api.OptimizedModule, "_use_dynamo", boom)
    x = torch.randn(4, 8)
    with pytest.warns(FusionFallbackWarning, match="capture"):
        opt = fusion.optimize(DataDependent(), (x,))
    torch.testing.assert_close(opt(x), DataDependent()(x))
