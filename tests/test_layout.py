"""Channels-last convolution nets (fusion/passes/layout.py): the layout measured faster is taken, the values
stay eager's, the weights are converted in place (never copied), and every path (optimize, the structural
cache, torch.compile, save/load, symbolic shapes, training) stays correct."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fusion
from fusion.costmodel import tuning
from fusion.passes import layout

aten = torch.ops.aten
CL = torch.channels_last


class ConvNet(nn.Module):
    """A ResNet basic block with a stem: conv-BN-ReLU, max pool, two 3x3 convs and a residual add, then a
    flattening view of the spatial dims (a view the channels-last layout cannot take)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 5, stride=2, padding=2, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.c1, self.bn1 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        for bn in (self.bn0, self.bn1, self.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        h = self.pool(torch.relu(self.bn0(self.stem(x))))
        y = torch.relu(self.bn1(self.c1(h)))
        y = torch.relu(self.bn2(self.c2(y)) + h)
        return y.flatten(2).mean(-1), y


def faked(monkeypatch, winner: str) -> None:
    """Every layout measurement says `winner` is twice as fast (the real measuring code path, records kept)."""
    def measure(candidates, rounds=tuning.ROUNDS):      # a layout-converting copy ("copy") costs 10 us
        return {name: (1e-5 if name == "copy" else 1e-3 if name == winner else 2e-3) for name in candidates}

    monkeypatch.setattr(tuning, "measure", measure)


def _model():
    torch.manual_seed(0)
    return ConvNet().eval(), torch.randn(2, 3, 32, 32)


def _conv_weights(m):
    return [m.stem.weight, m.c1.weight, m.c2.weight]


def _markers(gm):
    return layout.channels_last_weights(gm)


def _weights_channels_last(m) -> bool:
    return all(w.is_contiguous(memory_format=CL) for w in _conv_weights(m))


def _close(out, ref, assert_close) -> None:
    for a, b in zip(out, ref):
        assert_close(a, b)


def test_channels_last_when_it_measures_faster(tmp_path, monkeypatch, assert_close):
    faked(monkeypatch, "channels_last")
    m, x = _model()
    with torch.no_grad():
        ref = m(x)
        ptrs = [w.data_ptr() for w in _conv_weights(m)]
        opt = fusion.optimize(m, (x,), config=fusion.Config(cache_dir=str(tmp_path)))
        out = opt(x)
    info = opt.graphs[0].log.layout
    assert info["layout"] == "channels_last" and info["ops"] == 4 and info["pointwise_nhwc"] > 0, info
    assert len(_markers(opt.graphs[0].gm)) == 3
    _close(out, ref, assert_close)
    assert all(a.is_contiguous() for a in out)     # the program returns what eager returns
    # the weights were converted in place: new storage, same values, and the module still runs eagerly
    assert _weights_channels_last(m)
    assert all(w.data_ptr() != p for w, p in zip(_conv_weights(m), ptrs))
    with torch.no_grad():
        _close(m(x), ref, assert_close)
    # the pointwise ops between the convolutions run on NHWC views: no kernel operand is copied to NCHW
    permutes = [n for n in opt.graphs[0].gm.graph.nodes if n.target is aten.permute.default]
    assert permutes and all(n.args[1] in (layout.TO_NHWC, layout.TO_NCHW) for n in permutes)


def test_nchw_when_it_measures_faster(tmp_path, monkeypatch, assert_close):
    faked(monkeypatch, "nchw")
    m, x = _model()
    with torch.no_grad():
        ref = m(x)
        opt = fusion.optimize(m, (x,), config=fusion.Config(cache_dir=str(tmp_path)))
        out = opt(x)
    assert opt.graphs[0].log.layout["layout"] == "nchw" and not _markers(opt.graphs[0].gm)
    assert all(w.is_contiguous() for w in _conv_weights(m))
    _close(out, ref, assert_close)


def test_the_decision_reads_the_tuning_record_of_this_cpu(tmp_path, monkeypatch):
    """A second compile on the machine reads the stored times (no measuring): flip the records, flip the layout."""
    faked(monkeypatch, "channels_last")
    m, x = _model()
    cfg = fusion.Config(cache_dir=str(tmp_path), structural_cache=False)
    with torch.no_grad():
        assert fusion.optimize(m, (x,), config=cfg).graphs[0].log.layout["layout"] == "channels_last"
    monkeypatch.setattr(tuning, "measure", lambda *a, **k: pytest.fail("measured again"))
    m2, _ = _model()
    with torch.no_grad():
        assert fusion.optimize(m2, (x,), config=cfg).graphs[0].log.layout["layout"] == "channels_last"
    from fusion.store import cache

    entries = [cache.read_json(e) for e in (tmp_path / "tuning").rglob("layout-*.json")]
    ops = [e for e in entries if "nchw" in e["times"]]
    assert len(ops) == 4 and len(entries) > 4           # 3 convolutions and the pool; the border copies
    for entry in ops:                                   # the same entries, saying NCHW wins
        key = entry["key"]
        tuning.record("layout", key, {"nchw": 1e-3, "channels_last": 2e-3}, str(tmp_path), how="test")
    m3, _ = _model()
    with torch.no_grad():
        assert fusion.optimize(m3, (x,), config=cfg).graphs[0].log.layout["layout"] == "nchw"


def test_no_measurement_keeps_the_layout(tmp_path, monkeypatch):
    faked(monkeypatch, "channels_last")
    m, x = _model()
    with torch.no_grad():
        opt = fusion.optimize(m, (x,), config=fusion.Config(cache_dir=str(tmp_path), tune=False))
    assert not _markers(opt.graphs[0].gm) and all(w.is_contiguous() for w in _conv_weights(m))


def test_structural_cache_hit_converts_the_new_modules_weights(tmp_path, monkeypatch, assert_close):
    faked(monkeypatch, "channels_last")
    cfg = fusion.Config(cache_dir=str(tmp_path))
    m, x = _model()
    with torch.no_grad():
        fusion.optimize(m, (x,), config=cfg)
        torch.manual_seed(1)
        other = ConvNet().eval()
        ref = other(x)
        opt = fusion.optimize(other, (x,), config=cfg)
        assert opt.capture_method == "structural cache"
        out = opt(x)
    assert _weights_channels_last(other)
    _close(out, ref, assert_close)


def test_torch_compile_converts_after_its_first_call(tmp_path, monkeypatch, assert_close):
    faked(monkeypatch, "channels_last")
    m, x = _model()
    with torch.no_grad():
        ref = m(x)
        c = torch.compile(m, backend="fusion", options={"cache_dir": str(tmp_path)})
        outs = [c(x) for _ in range(3)]                # the second call retraces once on the new strides
    assert _weights_channels_last(m)
    for out in outs:
        _close(out, ref, assert_close)


def test_training_keeps_nchw_and_gradients(tmp_path, monkeypatch):
    faked(monkeypatch, "channels_last")
    m, x = _model()
    m.train()
    ref = ConvNet().train()
    ref.load_state_dict(m.state_dict())
    c = torch.compile(m, backend="fusion", options={"cache_dir": str(tmp_path)})
    c(x)[0].sum().backward()
    ref(x)[0].sum().backward()
    assert all(w.is_contiguous() for w in _conv_weights(m))
    for a, b in zip(_conv_weights(m), _conv_weights(ref)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_symbolic_shapes_keep_the_layout(tmp_path, monkeypatch, assert_close):
    faked(monkeypatch, "channels_last")
    m, x = _model()
    with torch.no_grad():
        ref = m(x)
        c = torch.compile(m, backend="fusion", dynamic=True, options={"cache_dir": str(tmp_path)})
        out = c(x)
    assert all(w.is_contiguous() for w in _conv_weights(m))
    _close(out, ref, assert_close)


def test_a_saved_channels_last_program_loads_and_runs(tmp_path, monkeypatch, assert_close):
    faked(monkeypatch, "channels_last")
    m, x = _model()
    with torch.no_grad():
        ref = m(x)
        opt = fusion.optimize(m, (x,), config=fusion.Config(cache_dir=str(tmp_path / "c")))
        opt.save(tmp_path / "prog")
        loaded = fusion.load(tmp_path / "prog", config=fusion.Config(cache_dir=str(tmp_path / "c")))
        out = loaded(x)
    _close(out, ref, assert_close)


def test_explain_says_which_layout_and_why(tmp_path, monkeypatch):
    faked(monkeypatch, "channels_last")
    m, x = _model()
    with torch.no_grad():
        text = fusion.optimize(m, (x,), config=fusion.Config(cache_dir=str(tmp_path))).explain()
    assert "layout: channels_last (its 4 convolutions and pools measured" in text and "channels-last in place" in text


def test_border_copies_count_against_channels_last(tmp_path, monkeypatch):
    """Faster convolutions do not pay for copying the graph's input to channels-last and its outputs back
    when those copies measured slower than the saving: the graph stays NCHW."""
    monkeypatch.setattr(tuning, "measure", lambda candidates, rounds=tuning.ROUNDS: {
        name: {"copy": 5e-3, "channels_last": 1e-3}.get(name, 2e-3) for name in candidates})
    m, x = _model()
    with torch.no_grad():
        opt = fusion.optimize(m, (x,), config=fusion.Config(cache_dir=str(tmp_path)))
    info = opt.graphs[0].log.layout
    assert info["layout"] == "nchw" and info["conversions"] >= 1, info
    assert all(w.is_contiguous() for w in _conv_weights(m))
