"""Reliability, fault injection per stage (normalize, rewrite, lower, a missing C++ compiler, a kernel failing
at run time, a stage that cannot be imported): the result equals eager and exactly one FusionFallbackWarning
names the stage. Through the public API (`fusion.optimize`, `torch.compile(backend="fusion")`)."""
from __future__ import annotations

import importlib
import random
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusion
from fusion.errors import FusionFallbackWarning
from tests.test_reliability import Wrap, close, compiled, fallback_messages, needs_lower

# ------------------------------------------------------------------------------------------------
# fault injection: each stage failing -> eager's result and exactly one warning naming the stage


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory):
    """A cache dir with this machine's hardware profile already measured, so that the only warnings a
    test sees are the ones it provokes."""
    d = tmp_path_factory.mktemp("fusion-cache")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fusion.optimize(nn.Linear(4, 4), (torch.randn(2, 4),), cache_dir=str(d))
    return str(d)


def _fault_model(scale: float):
    """A small program whose kernels are new for every `scale` (the constant is part of the kernel)."""

    def fn(x, w):
        h = F.layer_norm(x, (x.shape[-1],)) * scale
        return torch.softmax(h @ w, dim=-1) + F.gelu(h).sum(-1, keepdim=True)

    return fn


def _run_path(path, fn, inputs, cache_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if path == "optimize":
            out = fusion.optimize(Wrap(fn), inputs, cache_dir=cache_dir)(*inputs)
        else:
            with torch.no_grad():
                out = compiled(fn, options={"cache_dir": cache_dir})(*inputs)
    torch._dynamo.reset()
    return out, fallback_messages(caught)


_BASELINE: dict = {}


def _check_one_fallback(path, stage, inject, cache_dir, expect_text=None):
    """Run without the fault (baseline warnings), then with it: eager's result, the baseline warnings
    and exactly one more warning, which names `stage`."""
    fn = _fault_model(1.0 + random.random())
    inputs = (torch.randn(4, 32), torch.randn(32, 16))
    ref = fn(*inputs)
    if (path, cache_dir) not in _BASELINE:  # what this kind of program warns about without a fault
        _BASELINE[path, cache_dir] = _run_path(path, _fault_model(1.0 + random.random()), inputs, cache_dir)[1]
    baseline = _BASELINE[path, cache_dir]
    undo = inject()
    try:
        out, msgs = _run_path(path, fn, inputs, cache_dir)
    finally:
        if undo:
            undo()
    close(out, ref)
    named = [m for m in msgs if f"the {stage} stage failed" in m]
    assert len(named) == 1, f"expected one warning naming {stage!r}, got {msgs}"
    others = [m for m in msgs if m not in named]
    base = {m.split(";")[0] for m in baseline}
    assert all(m.split(";")[0] in base for m in others), f"unexpected extra warnings: {others}"
    if expect_text:
        assert expect_text in named[0], named[0]
    return named[0]


def _raising(*a, **k):
    raise RuntimeError("injected failure")


PATHS = ["optimize", "compile"]


@pytest.mark.parametrize("path", PATHS)
def test_normalize_failure_falls_back(path, warm_cache, monkeypatch):
    from fusion import pipeline

    _check_one_fallback(path, "normalize", lambda: monkeypatch.setattr(pipeline, "normalize", _raising),
                        warm_cache, "injected failure")


@pytest.mark.parametrize("path", PATHS)
def test_rewrite_failure_falls_back(path, warm_cache, monkeypatch):
    rewrites = importlib.import_module("fusion.rewrite")
    _check_one_fallback(path, "rewrite", lambda: monkeypatch.setattr(rewrites, "rewrite", _raising, raising=False),
                        warm_cache, "injected failure")


@needs_lower
@pytest.mark.parametrize("path", PATHS)
def test_lower_failure_falls_back(path, warm_cache, monkeypatch):
    lower = importlib.import_module("fusion.lower")
    _check_one_fallback(path, "lower", lambda: monkeypatch.setattr(lower, "plan_kernels", _raising),
                        warm_cache, "injected failure")


@pytest.mark.parametrize("module, stage", [("fusion.rewrite", "rewrite"), ("fusion.lower", "lower")])
def test_a_stage_that_cannot_be_imported_falls_back(module, stage, warm_cache, monkeypatch):
    # sys.modules[name] = None makes `import name` raise ImportError, as a broken or missing stage would
    def inject():
        monkeypatch.setitem(sys.modules, module, None)
        monkeypatch.delattr(fusion, module.rpartition(".")[2], raising=False)

    _check_one_fallback("optimize", stage, inject, warm_cache)


@needs_lower
@pytest.mark.parametrize("path", PATHS)
def test_missing_compiler_falls_back(path, warm_cache, monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    # no g++ on PATH (the kernel of every _fault_model is new, so it has to be compiled): the build pass fails
    _check_one_fallback(path, "build", lambda: monkeypatch.setenv("PATH", str(empty)), warm_cache)


@needs_lower
def test_a_kernel_failing_at_run_time_falls_back_once(warm_cache, monkeypatch):
    """A lowered program that raises when called warns once ("run") and runs the unlowered graph from then on."""
    runtime = importlib.import_module("fusion.backends.cpp.runtime")
    fn = _fault_model(1.0 + random.random())
    inputs = (torch.randn(4, 32), torch.randn(32, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = fusion.optimize(Wrap(fn), inputs, cache_dir=warm_cache)
    if not any(g.log.kernels for g in opt.graphs):
        pytest.skip("this program got no generated kernels")
    monkeypatch.setattr(runtime.FusedKernel, "forward", _raising)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [opt(*inputs) for _ in range(3)]
    msgs = fallback_messages(caught)
    assert len(msgs) == 1 and "the run stage failed" in msgs[0], msgs
    for out in outs:
        close(out, fn(*inputs))


@pytest.mark.parametrize("fn", [lambda x: torch.sum(x, dim=0, keepdim=True), lambda x: torch.amax(x, dim=-1),
                                lambda x: x.mean(0)], ids=["sum", "amax", "mean"])
def test_reductions_of_0dim_tensors_need_no_fallback(fn):
    """Regression: a 0-dim reduction used to panic inside egglog (caught, but the stage fell back)."""
    import warnings

    x = torch.tensor(1.5)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(fn, backend="fusion")(x)
    assert [w for w in caught if issubclass(w.category, FusionFallbackWarning)] == []
    torch.testing.assert_close(out, fn(x))


def test_a_rewritten_graph_that_raises_falls_back_to_the_captured_one():
    """If the lowered program and the rewritten graph behind it both raise (a rewrite bug), the call warns and
    runs the captured graph as it was before rewriting; a wrong rewrite never reaches the user as an error."""
    from fusion.config import Config
    from fusion.pipeline import CompiledGraph, CompileLog

    wrong = torch.fx.symbolic_trace(lambda x: x.view(999) * 2)      # raises at run time: no such view
    also_wrong = torch.fx.symbolic_trace(lambda x: x.view(998) * 2)
    captured = torch.fx.symbolic_trace(lambda x: x * 2)
    cg = CompiledGraph(wrong, also_wrong, CompileLog("inference", num_nodes=3), Config(), also_wrong, captured)
    x = torch.randn(4, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [cg(x) for _ in range(3)]
    msgs = [str(w.message) for w in caught if issubclass(w.category, FusionFallbackWarning)]
    assert len(msgs) == 2 and "before rewriting" in msgs[1], msgs
    for out in outs:
        torch.testing.assert_close(out, x * 2)
