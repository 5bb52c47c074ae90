"""Shared-input matmul merging (fusion/passes/merge.py, fusion/dialect/stacked.py): several linears on one input
become one GEMM + split where the cost model says so, over weights made adjacent IN PLACE (never copied).

Most tests force the cost model's verdict (`forced`) to test the mechanism on small shapes; the verdict
itself is tested in `test_cost_model_decides` and on the HF models (which use the machine's profile)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fusion
import fusion.dialect.stacked as stacked
import fusion.passes.merge as sm
from fusion.config import Config
from tests.conftest import rel_err

_use_count = torch._C._storage_Use_Count


def _opt(model, inputs, tmp_path, **kw):
    config = Config(fallback=False, structural_cache=False, **kw)   # the session cache dir: one profile
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fusion.optimize(model, inputs, config)


@pytest.fixture
def forced(monkeypatch):
    """The cost model's verdict forced to "merge" (the prediction is still computed and reported)."""
    real = sm.predict

    def merge(group, hw, tuner=None):
        return {**real(group, hw, tuner), "merged": True}

    monkeypatch.setattr(sm, "predict", merge)


@pytest.fixture
def spy(monkeypatch):
    """Counts how the merged op ran: one GEMM over the weight block, or the separate GEMMs."""
    runs = {"merged": 0, "separate": 0}
    real = stacked.weight_block

    def wb(*a, **k):
        out = real(*a, **k)
        runs["merged" if out is not None else "separate"] += 1
        return out

    monkeypatch.setattr(stacked, "weight_block", wb)
    return runs


class Projections(nn.Module):
    """len(widths) linears on one input (Q/K/V-like), combined so that every output matters."""

    def __init__(self, d=32, widths=(32, 32, 32), bias=True, extra_use=False):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(d, w, bias=bias) for w in widths)
        self.extra_use = extra_use

    def forward(self, x):
        h = x * 2.0                               # the shared input is an intermediate, not a graph input
        outs = [torch.tanh(lin(h)) for lin in self.lins]
        y = torch.cat([o.sum(-1, keepdim=True) * o[..., :4] for o in outs], -1)
        return y + h[..., :1] if self.extra_use else y


def _products(opt):
    return opt.graphs[0].log.fired.get("shared_matmul", [])


def _merged_calls(opt):
    return [n for n in opt.graphs[0].gm.graph.nodes if n.target is stacked.stacked_linear_impl]


def _one_block(params):
    storages = {p.untyped_storage().data_ptr() for p in params}
    return len(storages) == 1


@pytest.mark.parametrize("widths,bias", [((32, 32, 32), True), ((32, 32, 32), False), ((40, 24), True),
                                         ((40, 24), False), ((48, 8, 16), True)])
def test_merged_linears_match_eager(widths, bias, forced, spy, tmp_path):
    torch.manual_seed(0)
    model = Projections(widths=widths, bias=bias).eval()
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        ref = model(x)
    opt = _opt(model, (x,), tmp_path)
    assert len(_products(opt)) == len(widths)
    assert len(_merged_calls(opt)) == 1
    assert _one_block([lin.weight for lin in model.lins])
    if bias:
        assert _one_block([lin.bias for lin in model.lins])
    for x2 in (x, torch.randn(2, 12, 32)):
        with torch.no_grad():
            ref2 = model(x2)
        assert rel_err(opt(x2), ref2) <= 1e-4
    assert rel_err(opt(x), ref) <= 1e-4
    assert spy["merged"] >= 2 and spy["separate"] == 0


def test_shared_input_also_used_elsewhere(forced, spy, tmp_path):
    torch.manual_seed(1)
    model = Projections(extra_use=True).eval()
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        ref = model(x)
    opt = _opt(model, (x,), tmp_path)
    assert len(_products(opt)) == 3
    assert rel_err(opt(x), ref) <= 1e-4
    assert spy["merged"] >= 1


def test_weights_not_adjacent_run_the_separate_gemms(forced, spy, tmp_path):
    """A weight replaced after optimize (adjacency lost): same results through the separate GEMMs."""
    torch.manual_seed(2)
    model = Projections(widths=(32, 16, 24)).eval()
    x = torch.randn(2, 12, 32)
    opt = _opt(model, (x,), tmp_path)
    with torch.no_grad():
        model.lins[1].weight.data = model.lins[1].weight.data.clone() * 0.5   # no longer in the block
        ref = model(x)
    assert rel_err(opt(x), ref) <= 1e-4
    assert spy["separate"] >= 1 and spy["merged"] == 0


def test_weight_held_elsewhere_is_not_moved(forced, spy, tmp_path):
    """A weight whose storage someone else holds (a view) is never moved: moving it would leave two copies.
    The group then runs its separate GEMMs, with the same results."""
    torch.manual_seed(3)
    model = Projections().eval()
    held = model.lins[0].weight.detach()[:4]          # a view of the storage, kept alive by the caller
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        ref = model(x)
    opt = _opt(model, (x,), tmp_path)
    outcome = opt.graphs[0].log.rewrite_stats["stacked_weights"]
    assert "shared storage" in outcome.values()
    assert held.data_ptr() == model.lins[0].weight.data_ptr()
    assert rel_err(opt(x), ref) <= 1e-4
    assert spy["separate"] >= 1
    assert "not made adjacent (shared storage)" in opt.explain()


def test_stacking_moves_weights_without_a_copy(forced, tmp_path):
    """After optimize: each group's parameters are views into one block, the same objects, shapes, strides and
    values; the old storages are referenced by nobody (freed); the bytes held by parameters are unchanged."""
    torch.manual_seed(4)
    model = Projections(widths=(32, 16, 24)).eval()
    params = dict(model.named_parameters())
    before = {k: (p.detach().clone(), p.shape, p.stride()) for k, p in params.items()}
    old = {k: p.untyped_storage() for k, p in params.items()}   # Python handles on the old storages
    nbytes = sum(p.numel() * p.element_size() for p in params.values())
    opt = _opt(model, (torch.randn(2, 12, 32),), tmp_path)
    assert _products(opt)
    after = dict(model.named_parameters())
    for k, p in after.items():
        assert p is params[k] and isinstance(p, nn.Parameter)
        assert torch.equal(p, before[k][0]) and p.shape == before[k][1] and p.stride() == before[k][2]
        assert _use_count(old[k]._cdata) == 1, f"{k}: its old storage is still referenced"
    ws = [lin.weight for lin in model.lins]
    bs = [lin.bias for lin in model.lins]
    assert _one_block(ws) and _one_block(bs)
    block = ws[0].untyped_storage()
    assert block.nbytes() == sum(w.numel() * 4 for w in ws)
    assert [w.storage_offset() for w in ws] == [0, 32 * 32, 48 * 32]
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in after.values()}
    assert sum(storages.values()) == nbytes          # no parameter byte exists twice
    assert len(storages) == 2                         # one block of weights, one of biases


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x, y):
        return torch.tanh(self.q(x * 2)) + torch.tanh(self.k(y * 2))


class WeightUsedElsewhere(nn.Module):
    """q's weight is also read transposed by another product: q stays out, k and v merge."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        h = x * 2
        tied = h @ self.q.weight                   # W_q used (transposed w.r.t. the linear) elsewhere
        return torch.tanh(self.q(h)) + torch.tanh(self.k(h)) * torch.tanh(self.v(h)) + tied


class ReturnsProducts(nn.Module):
    """Products that are (views of) graph outputs: merging them would make outputs alias one buffer."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        h = x * 2
        return self.q(h), self.k(h)


def test_negative_cases(forced, tmp_path):
    torch.manual_seed(5)
    x, y = torch.randn(2, 12, 32), torch.randn(2, 12, 32)
    m = TwoInputs().eval()
    with torch.no_grad():
        ref = m(x, y)
    opt = _opt(m, (x, y), tmp_path)
    assert _products(opt) == [] and not _merged_calls(opt)
    assert rel_err(opt(x, y), ref) <= 1e-4

    m = WeightUsedElsewhere().eval()
    q_storage = m.q.weight.untyped_storage().data_ptr()
    with torch.no_grad():
        ref = m(x)
    opt = _opt(m, (x,), tmp_path)
    (call,) = _merged_calls(opt)
    assert [w.name for w in call.args[1]] == ["p_k_weight", "p_v_weight"]
    assert m.q.weight.untyped_storage().data_ptr() == q_storage          # not moved
    assert _one_block([m.k.weight, m.v.weight])
    assert rel_err(opt(x), ref) <= 1e-4

    m = ReturnsProducts().eval()
    with torch.no_grad():
        ref = m(x)
    opt = _opt(m, (x,), tmp_path)
    assert _products(opt) == []
    out = opt(x)
    assert out[0].data_ptr() != out[1].data_ptr() and all(rel_err(a, b) <= 1e-4 for a, b in zip(out, ref))


def test_disable_rule(forced, tmp_path):
    torch.manual_seed(6)
    model = Projections().eval()
    x = torch.randn(2, 12, 32)
    storage = model.lins[0].weight.untyped_storage().data_ptr()
    opt = _opt(model, (x,), tmp_path, disable_rules={"shared_matmul"})
    assert _products(opt) == [] and not opt.graphs[0].log.fallbacks
    assert model.lins[0].weight.untyped_storage().data_ptr() == storage


def test_explain_lists_the_rule_and_the_prediction(forced, tmp_path):
    model = Projections().eval()
    opt = _opt(model, (torch.randn(2, 12, 32),), tmp_path)
    text = opt.explain()
    assert "shared_matmul" in text and "replaced    3 nodes" in text
    assert "merged" in text and "[24 x 32] x [32 x 32+32+32]" in text


def test_cost_model_decides():
    """The verdict follows the profile: per-call costs and a library with a fixed cost per call favour one
    GEMM; with free calls and a flat GEMM rate the merged op's own overheads make it lose."""
    from fusion.costmodel.hardware import HardwareProfile

    base = dict(name="t", copy_bandwidth=40e9, cache_bandwidth=150e9, llc_bytes=32 << 20, vector_flops=25e9,
                transcendental_rate=1e9, page_fault_bandwidth=0.0)
    onednn = HardwareProfile(**base, gemm_flops={"float32": 100e9, "float32_onednn": 240e9},
                             kernel_overhead=2e-6, aten_overhead=1.5e-6, view_overhead=1.5e-6)
    flat = HardwareProfile(**base, gemm_flops={"float32": 100e9}, kernel_overhead=0.0, aten_overhead=0.0)

    class G(nn.Module):
        def __init__(self, d, widths):
            super().__init__()
            self.lins = nn.ModuleList(nn.Linear(d, w) for w in widths)

        def forward(self, x):
            h = x * 2
            return sum(torch.tanh(lin(h)).sum(-1) for lin in self.lins)

    from fusion.capture import capture_module, normalize
    for d, widths, m in ((768, (768,) * 3, 16), (2048, (5504,) * 2, 16)):
        cap = capture_module(G(d, widths).eval(), (torch.randn(m, d),))
        gm = normalize(cap.gm)
        params = {n.name for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith("p_")}
        (group,) = sm.candidate_groups(gm, params)
        fast = sm.predict(group, onednn)
        assert fast["merged"] and fast["library"] == "onednn", fast
        # at least the fixed costs of the calls saved, less the merged op's own (its call, one view per output)
        from fusion.passes.gemm import EXTRA_CALL_S
        n = len(widths)
        saved = (n - 1) * (EXTRA_CALL_S + 1.5e-6) - sm.STACKED_CALL_S - n * 1.5e-6
        assert fast["separate_s"] - fast["merged_s"] >= saved - 1e-9
        slow = sm.predict(group, flat)
        assert not slow["merged"] and slow["library"] == "aten", slow


@pytest.mark.parametrize("n", [1, 2, 3])
def test_runtime_op_layouts(n):
    """fusion.stacked_linear itself: adjacent blocks (merged), separate tensors, mixed biases, 0 rows."""
    torch.manual_seed(7)
    widths = [8, 5, 3][:n]
    ws = [torch.randn(w, 6) for w in widths]
    bs = [torch.randn(w) for w in widths]
    x = torch.randn(4, 6)
    ref = torch.cat([torch.nn.functional.linear(x, w, b) for w, b in zip(ws, bs)], -1)
    op = torch.ops.fusion.stacked_linear.default
    assert rel_err(op(x, ws, bs), ref) <= 1e-5
    if n > 1:
        mixed = [bs[0]] + [None] * (n - 1)
        ref_mixed = torch.cat([torch.nn.functional.linear(x, w, b) for w, b in zip(ws, mixed)], -1)
        assert rel_err(op(x, ws, mixed), ref_mixed) <= 1e-5
        assert stacked.make_adjacent(ws) == "stacked" and stacked.make_adjacent(bs) == "stacked"
        assert stacked.make_adjacent(ws) == "adjacent"
        assert stacked.weight_block(ws, bs) is not None
        for onednn in (False, True):
            assert rel_err(stacked.stacked_linear_impl(x, ws, bs, onednn), ref) <= 1e-5
        assert stacked.stacked_linear_impl(x[:0], ws, bs, True).shape == (0, sum(widths))
        # the block view never reaches past the first weight's storage
        other = [ws[0].clone()] + ws[1:]
        assert stacked.weight_block(other, [None] * n) is None


# ---------------------------------------------------------------------------------------------- HF models
transformers = pytest.importorskip("transformers")
LAYERS = 4


def bert(d=64):
    return transformers.BertModel(transformers.BertConfig(
        num_hidden_layers=LAYERS, hidden_size=d, num_attention_heads=4, intermediate_size=4 * d, vocab_size=100,
        max_position_embeddings=64, attn_implementation="eager"))


def llama(d=64):   # grouped-query: k/v are half as wide as q (different output widths in one group)
    return transformers.LlamaModel(transformers.LlamaConfig(
        num_hidden_layers=LAYERS, hidden_size=d, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=172, vocab_size=100, max_position_embeddings=64, attn_implementation="eager",
        use_cache=False))


#: groups per layer: their weights' module suffixes
GROUPS = {"bert": [("query", "key", "value")], "llama": [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")]}


def _hf(name, tmp_path, force, monkeypatch):
    if force:
        real = sm.predict
        monkeypatch.setattr(sm, "predict", lambda g, hw, tuner=None: {**real(g, hw, tuner), "merged": True})
    torch.manual_seed(0)
    model = (bert if name == "bert" else llama)().eval()
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    return model, ids, ref, _opt(model, (ids,), tmp_path)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_hf_groups_per_layer_merge_and_match_eager(name, tmp_path, monkeypatch, spy):
    """Forced merge: every layer's Q/K/V (and LLaMA's gate/up) is one GEMM over one weight block; outputs match."""
    model, ids, ref, opt = _hf(name, tmp_path, True, monkeypatch)
    decisions = opt.graphs[0].log.rewrite_stats["shared_matmul"]
    want = [(i, g) for i in range(LAYERS) for g in GROUPS[name]]
    assert len(decisions) == len(want)
    for d, (i, g) in zip(decisions, want):
        assert len(d["weights"]) == len(g)
        assert all(w.endswith(f"_{s}_weight") and (f"layers_{i}_" in w or f"layer_{i}_" in w)
                   for w, s in zip(d["weights"], g)), d["weights"]
    assert len(opt.graphs[0].log.fired["shared_matmul"]) == sum(len(g) for _, g in want)
    layers = model.encoder.layer if name == "bert" else model.layers
    for layer in layers:
        if name == "bert":
            a = layer.attention.self
            mods = [a.query, a.key, a.value]
        else:
            mods = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
            assert _one_block([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight])
        assert _one_block([m.weight for m in mods])
    with torch.no_grad():
        out = opt(ids).last_hidden_state
    assert rel_err(out, ref) <= 1e-4
    assert spy["merged"] >= len(want) and spy["separate"] == 0


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_hf_merge_where_the_cost_model_says_so(name, tmp_path, monkeypatch):
    """The machine's own profile decides, group by group: a group's products are replaced iff its prediction
    says merged is faster, and the program matches eager either way."""
    model, ids, ref, opt = _hf(name, tmp_path, False, monkeypatch)
    log = opt.graphs[0].log
    decisions = log.rewrite_stats["shared_matmul"]
    assert len(decisions) == LAYERS * len(GROUPS[name])
    fired = set(log.fired.get("shared_matmul", []))
    for d in decisions:
        assert d["merged"] == (d["merged_s"] < d["separate_s"])
        assert d["merged"] == (set(d["products"]) <= fired)
    assert len(fired) == sum(len(d["products"]) for d in decisions if d["merged"])
    with torch.no_grad():
        out = opt(ids).last_hidden_state
    assert rel_err(out, ref) <= 1e-4


def test_torch_compile_stays_unmerged_and_tolerates_rebinding():
    """Under torch.compile the backend merges nothing (parameters are guarded graph inputs it does not move).
    Rebinding them to views of one block (what fusion.optimize does) keeps Dynamo's guards passing: no
    recompile, same results (the measured basis for enabling the merge there later)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(8)
    m = Projections().eval()
    x = torch.randn(2, 12, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = m(x)
        c = torch.compile(m, backend="fusion")
        assert rel_err(c(x), ref) <= 1e-4
        from fusion.pipeline import RECENT
        assert "shared_matmul" not in RECENT[-1].log.fired
        frames = dict(counters["stats"])
        assert stacked.make_adjacent([lin.weight for lin in m.lins]) == "stacked"
        assert rel_err(c(x), ref) <= 1e-4
        assert dict(counters["stats"]) == frames        # no new graph captured: no recompile
    torch._dynamo.reset()
