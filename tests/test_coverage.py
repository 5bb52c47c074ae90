"""The fusion coverage report (fusion/analysis/coverage.py): every softmax / norm / activation / attention site
of a program and whether it fused, so a spelling the rules miss is visible with its location."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusion
from fusion.analysis import coverage as cov
from fusion.analysis.coverage import Site, coverage_of, format_coverage

SECTION = "fusion coverage (softmax / norm / activation / attention sites in the captured graph):"


@pytest.fixture(scope="module")
def _profiles(tmp_path_factory) -> Path:
    """This machine's profile, calibrated once for the module (seconds) instead of once per test cache dir."""
    from fusion.pipeline import hardware

    root = tmp_path_factory.mktemp("calibrated")
    hardware(fusion.Config(cache_dir=str(root)))
    return root / "profiles"


@pytest.fixture
def cache(tmp_path, _profiles) -> Path:
    """A fresh cache dir per test (no rewrite or structural hits from other tests) holding the profile."""
    shutil.copytree(_profiles, tmp_path / "profiles")
    return tmp_path


def _optimize(model: nn.Module, args: tuple, cache_dir: Path, **options) -> fusion.OptimizedModule:
    config = fusion.Config(codegen="aten", cache_dir=str(cache_dir), **options)  # no C++ build: fast
    return fusion.optimize(model.eval(), args, config=config)


def _section(text: str) -> str:
    start = text.index(SECTION)
    end = text.find("\n\n", start)
    return text[start:end if end >= 0 else None]


class Fused(nn.Module):
    """Spellings the rules cover: softmax, layer norm, erf GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16))
        self.b = nn.Parameter(torch.randn(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(F.layer_norm(torch.softmax(x, -1), (16,), self.w, self.b))


class EpsSoftmax(nn.Module):
    """exp / (sum exp + eps): not a softmax (the eps changes it), so no rule fires; it looks like a miss."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.exp(x)
        return e / (e.sum(-1, keepdim=True) + 1e-9)


class WithHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = EpsSoftmax()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x * 2.0)


class SelfAttention(nn.Module):
    """softmax over the query dim (-2): not attention as SDPA computes it, so it stays GEMM + softmax + GEMM."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.softmax(q @ k.transpose(-1, -2), dim=-2) @ v


class Bertish(nn.Module):
    """Module paths as in HF BERT: encoder.layer.0.attention.self."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.Module()
        layer.attention = nn.Module()
        layer.attention.self = SelfAttention()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([layer])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.encoder.layer[0].attention.self(q, k, v)


def test_covered_spellings_are_all_fused(cache):
    opt = _optimize(Fused(), (torch.randn(4, 16),), cache)
    sites = coverage_of(opt)
    assert sorted((s.kind, s.op) for s in sites) == [("activation", "gelu"), ("norm", "layer_norm"),
                                                     ("softmax", "softmax")]
    assert all(s.fused for s in sites)
    text = _section(opt.explain())
    assert "3 sites, 0 unfused" in text and "NOT FUSED" not in text
    assert "softmax" in text and "norm" in text and "activation" in text
    json.dumps(opt.graphs[0].log.coverage)          # the log holds plain data (saved with programs)


def test_a_missed_softmax_spelling_is_reported_with_its_location(cache):
    opt = _optimize(WithHead(), (torch.randn(4, 16),), cache)
    assert "softmax" not in opt.graphs[0].log.fired      # the premise: no rule covers this spelling
    [site] = coverage_of(opt)
    assert (site.kind, site.fused, site.op) == ("softmax", False, "exp+sum+div")
    assert site.where == "head"                       # the module the exp was written in
    text = _section(opt.explain())
    assert "1 sites, 1 unfused" in text
    assert "NOT FUSED softmax" in text and "exp+sum+div" in text and "head" in text
    # a second optimize of the same architecture is a structural cache hit: the report comes back with it
    again = _optimize(WithHead(), (torch.randn(4, 16),), cache)
    assert [p.name for p in again.graphs[0].log.passes] == ["structural cache"]
    assert coverage_of(again) == [site]


def test_unfused_attention_is_reported_beside_its_fused_softmax(cache):
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    opt = _optimize(Bertish(), (q, k, v), cache)
    assert "attention" not in opt.graphs[0].log.fired
    sites = {s.kind: s for s in coverage_of(opt)}
    assert set(sites) == {"softmax", "attention"}
    assert sites["softmax"].fused                      # the softmax itself fused ...
    att = sites["attention"]                           # ... but not into attention: two GEMMs stay
    assert (att.fused, att.op) == (False, "bmm+softmax+bmm")
    assert att.where == "encoder.layer.0.attention.self"
    assert "NOT FUSED attention    bmm+softmax+bmm" in _section(opt.explain())


def test_pointwise_program_has_no_sites(cache):
    class Affine(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 + 1

    opt = _optimize(Affine(), (torch.randn(4, 16),), cache)
    assert coverage_of(opt) == [] and opt.graphs[0].log.coverage == []
    assert _section(opt.explain()) == SECTION + "\n  (none)"
    assert format_coverage([]) == ""


def test_detection_on_graphs():
    """Spelled-out forms are found on a graph no rule has seen (the core-ATen capture itself)."""
    def rms(x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def gelu(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + torch.tanh(0.79788456 * (x + 0.044715 * x ** 3)))

    def gated(x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x[:, :8]) * x[:, 8:]

    def softmax(x: torch.Tensor) -> torch.Tensor:
        return x.exp() / x.exp().sum(-1, keepdim=True)           # two exps: export does not CSE them

    def log_softmax(x: torch.Tensor) -> torch.Tensor:
        return x - torch.log(torch.exp(x).sum(-1, keepdim=True))

    def loss(x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt((x * x).sum()) + torch.tanh(x).sum()   # a global norm, a plain tanh: no sites

    from tests.conftest import aten_graph

    x = torch.randn(4, 16)
    found = {f.__name__: [(s.kind, s.fused, s.op) for s in cov.coverage(aten_graph(f, (x,)))]
             for f in (rms, gelu, gated, softmax, log_softmax, loss)}
    assert found == {"rms": [("norm", False, "mean+rsqrt")], "gelu": [("activation", False, "tanh+add")],
                     "gated": [("activation", False, "sigmoid+mul")], "softmax": [("softmax", False, "exp+sum+div")],
                     "log_softmax": [("log_softmax", False, "exp+sum+log")], "loss": []}


def test_location_spellings():
    dynamo = {"nn_module_stack": {"k": ("L['self'].encoder.layer[0]", "X"), "j": ("L['self'].encoder", "Y")}}
    assert cov._location(dynamo) == "encoder"                               # the innermost (last) entry
    assert cov._location({"nn_module_stack": {"k": ("L['self'].layer[0]", "X")}}) == "layer.0"
    trace = 'File "/src/model.py", line 12, in forward\n    y = f(x)'
    assert cov._location({"nn_module_stack": {"k": ("", "Root")}, "stack_trace": trace}) == "model.py:12"
    assert cov._location({}) == ""


def test_a_failing_report_never_fails_the_rewrite(cache, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(cov, "coverage_records", broken)
    opt = _optimize(EpsSoftmax(), (torch.randn(4, 16),), cache, structural_cache=False)
    log = opt.graphs[0].log
    assert log.coverage == [] and not log.fallbacks
    assert [p.ok for p in log.passes if p.name == "rewrite"] == [True]


def test_old_artifacts_load_without_a_report(cache):
    from fusion.store import artifact

    opt = _optimize(WithHead(), (torch.randn(4, 16),), cache, structural_cache=False)
    data, sources = artifact.dump(opt.graphs[0])
    assert data["coverage"] == opt.graphs[0].log.coverage != []
    del data["coverage"]                                  # as stored before the report existed
    assert artifact.restore(data, sources, opt.config).log.coverage == []


@pytest.mark.parametrize("site", [Site("norm", True, "rms_norm", "rms_norm", "model.norm")])
def test_format_accepts_sites_and_dicts(site):
    from dataclasses import asdict

    assert format_coverage([site]) == format_coverage([asdict(site)])
    assert "norm" in format_coverage([site]) and "rms_norm x1" in format_coverage([site])


def test_an_attention_the_cost_model_kept_unfused_is_told_apart_from_a_missed_spelling():
    """The rewrite records which fused forms its e-graph held ("offered"); an unfused site of such a kind was
    a cost decision and says so, an unfused site of a kind no rule offered is a miss (the plain NOT FUSED)."""
    from fusion.config import Config
    from fusion.rewrite import rewrite
    from tests.conftest import aten_graph

    def attention(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v

    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    gm = aten_graph(attention, (q, k, v))
    assert "attention" in rewrite(gm, Config()).stats["offered"]          # the rule matched this spelling
    gm = aten_graph(attention, (q, k, v))                                   # the unfused program, as captured
    kept = {s["kind"]: s for s in cov.coverage_records(gm, None, offered=["attention", "softmax"])}
    missed = {s["kind"]: s for s in cov.coverage_records(gm, None)}
    assert kept["attention"]["priced_out"] and not kept["attention"]["fused"]
    assert not missed["attention"]["priced_out"]
    assert "priced this one cheaper" in format_coverage(list(kept.values()))
    assert "priced" not in format_coverage(list(missed.values()))
