"""Measured choices (fusion/costmodel/tuning.py, fusion/passes/gemm.py GemmTuner): each fp32 CPU product goes
to the library measured fastest at its own shape on this CPU, whatever the profile's global rates say; the
same code picks MKL on a machine whose record says MKL wins and oneDNN where oneDNN wins."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from fusion.costmodel import tuning
from fusion.extract.pricing import DEFAULT_PROFILE
from fusion.passes.gemm import ONEDNN_KEY, GemmTuner, onednn_linear, use_onednn_gemms

from .conftest import rel_err

pytestmark = pytest.mark.skipif(onednn_linear() is None, reason="this torch has no oneDNN")

#: profiles whose one global ratio says the opposite of the records below
ONEDNN_FAST = dataclasses.replace(DEFAULT_PROFILE, gemm_flops={"float32": 1e11, ONEDNN_KEY: 2.5e11})
ONEDNN_SLOW = dataclasses.replace(DEFAULT_PROFILE, gemm_flops={"float32": 1e11, ONEDNN_KEY: 1.05e11})


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(256, 512), nn.Linear(512, 256, bias=False)
        self.w = nn.Parameter(torch.randn(256, 128) / 16)   # x @ w: a row-major [K, N] operand ("nn")

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) @ self.w


#: the model's three products at x = [4, 16, 256]: (m, k, n, bias, layout)
PRODUCTS = [(64, 256, 512, True, "nt"), (64, 512, 256, False, "nt"), (64, 256, 128, False, "nn")]


def graph(m, x):
    from fusion.capture import capture_module

    return capture_module(m, (x,)).gm


def fake_machine(tmp_path, winner: str) -> str:
    """A tuning cache whose records say `winner` is 2x faster at every product of the model (with and without
    its bias: lowering may move a bias into the next kernel)."""
    loser = "aten" if winner == "onednn" else "onednn"
    for m, k, n, _, layout in PRODUCTS:
        for bias in (True, False):
            tuning.record("linear", GemmTuner.key(m, k, n, bias, layout), {winner: 1e-4, loser: 2e-4},
                          str(tmp_path), how="test")
    return str(tmp_path)


def moved(gm, hw, tuner):
    new, count = use_onednn_gemms(gm, hw, tuner)
    return count, sum(n.target is onednn_linear() for n in new.graph.nodes)


@pytest.mark.parametrize("winner, profile, expected", [
    ("onednn", ONEDNN_SLOW, 3),     # the record says oneDNN wins: all three move, though the profile says not
    ("aten", ONEDNN_FAST, 0),       # the record says MKL wins: none moves, though the profile says oneDNN
])
def test_the_measured_winner_decides_not_the_profile(tmp_path, winner, profile, expected):
    gm = graph(MLP().eval(), torch.randn(4, 16, 256))
    tuner = GemmTuner(fake_machine(tmp_path, winner), measure=False)
    assert moved(gm, profile, tuner) == (expected, expected)


def test_per_shape_not_global(tmp_path):
    """One product measured faster on oneDNN, the others on MKL: only that one moves."""
    fake_machine(tmp_path, "aten")
    m, k, n, bias, layout = PRODUCTS[0]
    tuning.record("linear", GemmTuner.key(m, k, n, bias, layout), {"aten": 2e-4, "onednn": 1e-4}, str(tmp_path))
    gm = graph(MLP().eval(), torch.randn(4, 16, 256))
    new, count = use_onednn_gemms(gm, ONEDNN_FAST, GemmTuner(str(tmp_path), measure=False))
    assert count == 1
    (lin,) = [n for n in new.graph.nodes if n.target is onednn_linear()]
    assert lin.args[1].name == "p_a_weight"


def test_measured_once_then_read_by_any_process(tmp_path):
    """A product is timed at compile time within the budget, stored, and read back (not re-measured) by a
    new tuner — what a second process does; results stay eager's."""
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(4, 16, 256)
    gm = graph(model, x)
    first = GemmTuner(str(tmp_path), budget_s=30.0)
    new, _ = use_onednn_gemms(gm, DEFAULT_PROFILE, first)
    assert len(first.budget.measured) == 3 and first.budget.spent > 0
    for m, k, n, bias, layout in PRODUCTS:
        times = tuning.lookup("linear", GemmTuner.key(m, k, n, bias, layout), str(tmp_path))
        assert set(times) == {"aten", "onednn"} and all(t > 0 for t in times.values())
    second = GemmTuner(str(tmp_path), budget_s=30.0)
    again, _ = use_onednn_gemms(gm, DEFAULT_PROFILE, second)
    assert second.budget.measured == [] and again.code == new.code
    params = dict(model.named_parameters())
    args = [params[n.target.removeprefix("p_").replace("_", ".", 1)] if n.name.startswith("p_") else x
            for n in new.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        assert rel_err(new(*args)[0], model(x)) <= 1e-5


def test_no_budget_left_keeps_the_profiles_choice(tmp_path):
    gm = graph(MLP().eval(), torch.randn(4, 16, 256))
    broke = GemmTuner(str(tmp_path), budget_s=0.0)
    assert moved(gm, ONEDNN_FAST, broke) == (3, 3) and moved(gm, ONEDNN_SLOW, broke) == (0, 0)
    assert broke.budget.measured == []


def test_another_cpu_never_reads_these_records(tmp_path, monkeypatch):
    key = GemmTuner.key(*PRODUCTS[0])
    tuning.record("linear", key, {"aten": 1.0, "onednn": 2.0}, str(tmp_path))
    assert tuning.lookup("linear", key, str(tmp_path)) is not None
    real = tuning.cpu_identity
    monkeypatch.setattr(tuning, "cpu_identity", lambda threads=None: {**real(threads), "model": "999"})
    assert tuning.lookup("linear", key, str(tmp_path)) is None


def test_identity_names_the_cpu():
    ident = tuning.cpu_identity()
    assert {"vendor", "family", "model", "flags", "threads", "torch", "onednn"} <= set(ident)
    assert ident["threads"] == str(torch.get_num_threads())


def test_big_products_are_measured_on_a_proxy_within_the_memory_cap(tmp_path, monkeypatch):
    """An LM-head-sized product is timed with fewer rows/columns: measuring never allocates past the cap."""
    monkeypatch.setattr(tuning, "MAX_MEASURE_BYTES", 1 << 20)
    seen = []
    real_randn = torch.randn

    def randn(*shape, **kw):
        t = real_randn(*shape, **kw)
        seen.append(t.numel() * t.element_size())
        return t

    monkeypatch.setattr(torch, "randn", randn)
    times = GemmTuner(str(tmp_path), budget_s=30.0).times(512, 128, 50257, True, "nt")
    assert times and set(times) == {"aten", "onednn"}
    assert sum(seen) <= 1 << 20


def test_optimize_takes_the_measured_winner_and_reports_it(tmp_path):
    """Through the public API: fusion.optimize measures the products it has no record of (Config.tune, the
    default), uses each winner, and a second optimize of the same shapes measures nothing."""
    import fusion

    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(4, 16, 256)
    cfg = fusion.Config(cache_dir=str(tmp_path), structural_cache=False)
    first = fusion.optimize(model, (x,), config=cfg)
    assert first.graphs[0].log.gemm_tuning["measured"] >= 3
    second = fusion.optimize(model, (x,), config=cfg)
    assert second.graphs[0].log.gemm_tuning["measured"] == 0
    assert second.code == first.code
    with torch.no_grad():
        assert rel_err(second(x), model(x)) <= 1e-4


@pytest.mark.parametrize("winner", ["onednn", "aten"])
def test_optimize_follows_the_record_of_this_machine(tmp_path, winner):
    import fusion

    fake_machine(tmp_path, winner)
    model, x = MLP().eval(), torch.randn(4, 16, 256)
    opt = fusion.optimize(model, (x,), config=fusion.Config(cache_dir=str(tmp_path), structural_cache=False))
    assert opt.graphs[0].log.gemm_tuning["measured"] == 0
    assert (opt.graphs[0].log.onednn_gemms == 3) is (winner == "onednn")
    assert ("linear" in opt.code) is (winner == "onednn")
    with torch.no_grad():
        assert rel_err(opt(x), model(x)) <= 1e-4


def test_tune_off_and_bad_budgets():
    import fusion

    assert fusion.Config(tune=False).key() != fusion.Config().key()
    assert fusion.Config(tune_budget_s=1.0).key() == fusion.Config().key()   # the budget never changes a program
    with pytest.raises(fusion.ConfigError, match="tune_budget_s"):
        fusion.Config(tune_budget_s=-1)


class MLPAttention(nn.Module):
    """Linears, a fused norm and SDPA: every bucket of time_split has something in it."""

    def __init__(self):
        super().__init__()
        self.mlp = MLP()
        self.norm = nn.LayerNorm(128)

    def forward(self, x):
        h = self.norm(self.mlp(x))                       # [4, 16, 128]
        q = h.view(4, 16, 2, 64).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(4, 16, 128)


def test_time_split_names_where_the_time_goes(tmp_path):
    import fusion

    torch.manual_seed(0)
    model, x = MLPAttention().eval(), torch.randn(4, 16, 256)
    opt = fusion.optimize(model, (x,), config=fusion.Config(cache_dir=str(tmp_path), structural_cache=False))
    split = opt.time_split()
    parts = [split[k] for k in ("gemm_s", "attention_s", "fused_s", "other_s")]
    assert all(p > 0 for p in parts[:3]) and parts[3] >= 0, split
    assert split["total_s"] == pytest.approx(sum(parts))
    flops = 2 * 64 * (256 * 512 + 512 * 256 + 256 * 128) + 2 * 2 * (4 * 2 * 16 * 16 * 64)  # linears + attention
    assert split["gemm_flops"] == pytest.approx(flops, rel=0.05)
    assert 0 < split["gemm_roofline_fraction"] <= split["gemm_s"] / split["total_s"] * 1.5 + 0.05


def test_time_split_of_a_program_from_the_structural_cache_counts_its_gemms(tmp_path):
    """A second optimize of the architecture restores the program without example values: its products and
    convolutions still count as GEMM time with the fresh compile's FLOPs (they read as "other" before)."""
    import fusion

    def conv():
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()).eval()

    torch.manual_seed(0)
    for build, x in ((lambda: MLPAttention().eval(), torch.randn(4, 16, 256)), (conv, torch.randn(2, 3, 16, 16))):
        cfg = fusion.Config(cache_dir=str(tmp_path))
        fresh = fusion.optimize(build(), (x,), config=cfg).time_split()
        opt = fusion.optimize(build(), (x,), config=cfg)   # another instance (a channels-last program converted the first's weights)
        assert opt.capture_method == "structural cache"
        again = opt.time_split()
        assert again["gemm_flops"] == pytest.approx(fresh["gemm_flops"]) and fresh["gemm_flops"] > 0
        assert again["gemm_s"] > 0.5 * again["total_s"] * fresh["gemm_s"] / fresh["total_s"], (fresh, again)


def test_the_gemm_roofline_rate_is_a_matrix_product_rate():
    """Attention's calibrated rate (which counts the FLOPs a causal kernel skips) is not a GEMM rate: the
    roofline takes the fastest plain-product rate (profile keys float32 / float32_onednn)."""
    from fusion.analysis.timing import NodeStats, time_split

    hw = dataclasses.replace(DEFAULT_PROFILE, gemm_flops={"float32": 1e11, ONEDNN_KEY: 2e11,
                                                          "float32_attention": 9e11, "float32_bmm": 5e10})
    stats = [NodeStats("mm", "mm.default", 2e9, 0, 0, 0, 0.0, 0.02, "aten", 2e9)]
    split = time_split(torch.fx.GraphModule(nn.Module(), torch.fx.Graph()), stats, hw)
    assert split["gemm_roofline_s"] == pytest.approx(2e9 / 2e11) and split["gemm_roofline_fraction"] == pytest.approx(0.5)


def test_gemm_roofline_uses_the_rate_measured_at_the_shape(tmp_path):
    """A tuning record that says this CPU runs the model's products 100x faster than its profile's rate
    moves the roofline (the rate at the node's own shape counts, not only the profile's square product)."""
    import fusion
    from fusion.analysis.timing import graph_stats, time_split
    from fusion.pipeline import hardware

    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(4, 16, 256)
    opt = fusion.optimize(model, (x,), config=fusion.Config(cache_dir=str(tmp_path), structural_cache=False))
    g = opt.graphs[0]
    stats, _ = graph_stats(g.gm, opt.flat_args(x), hardware(g.config), {k.name: k for k in g.log.kernels})
    before = time_split(g.gm, stats, hardware(g.config), str(tmp_path))
    for m, k, n, _, layout in PRODUCTS:
        for bias in (True, False):
            tuning.record("linear", GemmTuner.key(m, k, n, bias, layout),
                          {"aten": 2 * m * k * n / 1e14, "onednn": 2 * m * k * n / 1e14}, str(tmp_path), how="test")
    after = time_split(g.gm, stats, hardware(g.config), str(tmp_path))
    assert after["gemm_roofline_s"] < 0.5 * before["gemm_roofline_s"], (before, after)


def test_candidates_are_built_and_timed_on_real_tensors_inside_a_fake_mode(tmp_path):
    """torch.compile hands the backend a graph under an active FakeTensorMode: the candidates' operands are
    still real tensors (a fake one would time only the dispatch, and data-dependent code would raise)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    seen = []

    def make():
        a = torch.randn(64, 64)
        seen.append(isinstance(a, FakeTensor))
        return {"mm": lambda: (a @ a).sum().item(), "add": lambda: (a + a).sum().item()}

    with FakeTensorMode():
        times = tuning.fastest("probe", "fake-mode 64", make, str(tmp_path), tuning.Budget(5.0))
    assert seen == [False] and set(times) == {"mm", "add"} and all(t > 0 for t in times.values())
