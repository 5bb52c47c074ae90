"""The structural cache (a second optimize of an architecture skips capture) and fast loading of saved
programs (no lowering): hits, misses, safety, and what never runs on those paths."""
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusion
from fusion.store import repro
from fusion.store import structural
from fusion.errors import FusionFallbackWarning
from tests.test_api import Block

ROOT = str(Path(__file__).resolve().parent.parent)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _entries(cache_dir):
    return sorted((Path(cache_dir) / "modules").glob("*.json"))


def test_hit_with_other_weights_runs_the_new_weights(tmp_path):
    cfg = fusion.Config(cache_dir=str(tmp_path))
    x = torch.randn(2, 8, 32)
    torch.manual_seed(0)
    first = Block().eval()
    opt1 = fusion.optimize(first, (x,), config=cfg)
    assert opt1.capture_method == "torch.export" and len(_entries(tmp_path)) == 1
    torch.manual_seed(1)
    other = Block().eval()  # same architecture, other weights
    opt2 = fusion.optimize(other, (x,), config=cfg)
    assert opt2.capture_method == "structural cache"
    assert opt2.graphs[0].log.kernels and opt2.graphs[0].log.fired == opt1.graphs[0].log.fired
    assert _rel(opt2(x), other(x)) <= 1e-5 and _rel(opt2(x), first(x)) > 1e-2
    assert opt2.code == opt1.code
    with torch.no_grad():
        other.fc2.bias.add_(1.0)  # bound by name, not copied: in-place updates are seen
    assert _rel(opt2(x), other(x)) <= 1e-5
    assert "structural cache" in opt2.explain()
    # what needs the unlowered graphs rebuilds them from the entry: reproducers, save/load
    assert repro.replay(repro.dump(opt2, tmp_path / "r.json")).same_decisions
    opt2.save(tmp_path / "prog")
    assert _rel(fusion.load(tmp_path / "prog")(x), other(x)) <= 1e-5


def test_other_shapes_and_config_miss(tmp_path):
    cfg = fusion.Config(cache_dir=str(tmp_path))
    m = Block().eval()
    fusion.optimize(m, (torch.randn(2, 8, 32),), config=cfg)
    assert fusion.optimize(m, (torch.randn(2, 9, 32),), config=cfg).capture_method == "torch.export"
    assert fusion.optimize(m, (torch.randn(2, 8, 32),), config=cfg.replace(disable_rules={"silu"})).capture_method == "torch.export"
    assert fusion.optimize(m, (torch.randn(2, 8, 32),), config=cfg).capture_method == "structural cache"
    off = cfg.replace(structural_cache=False)
    n = len(_entries(tmp_path))
    assert fusion.optimize(m, (torch.randn(2, 7, 32),), config=off).capture_method == "torch.export"
    assert len(_entries(tmp_path)) == n  # off: nothing looked up, nothing stored


class Norm(nn.Module):
    def __init__(self, eps=1e-5, act="gelu"):
        super().__init__()
        self.ln = nn.LayerNorm(32, eps=eps)
        self.fc = nn.Linear(32, 32)
        self.act = act  # a plain attribute that changes forward

    def forward(self, x):
        h = self.fc(self.ln(x))
        return F.gelu(h) if self.act == "gelu" else F.silu(h) * SCALE


SCALE = 1.0  # a global that changes the computation


@pytest.mark.parametrize("change", ["eps", "attribute", "global", "tied"])
def test_a_change_to_the_computation_misses(tmp_path, monkeypatch, change):
    cfg = fusion.Config(cache_dir=str(tmp_path))
    x = torch.randn(4, 32)
    base = Norm(act="silu").eval()
    assert fusion.optimize(base, (x,), config=cfg).capture_method == "torch.export"
    assert fusion.optimize(Norm(act="silu").eval(), (x,), config=cfg).capture_method == "structural cache"
    changed = Norm(act="silu").eval()
    if change == "eps":
        changed = Norm(eps=1e-3, act="silu").eval()
    elif change == "attribute":
        changed = Norm(act="gelu").eval()
    elif change == "global":
        monkeypatch.setattr(sys.modules[__name__], "SCALE", 2.0)
    else:
        changed.ln.weight = changed.fc.bias  # the same names, but one tensor where there were two
    opt = fusion.optimize(changed, (x,), config=cfg)
    assert opt.capture_method == "torch.export", change
    assert _rel(opt(x), changed(x)) <= 1e-5


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("steps", torch.zeros(()))
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        self.steps.add_(1)  # mutates a buffer
        return torch.softmax(self.fc(x), -1)


def test_forwards_with_side_effects_are_not_cached(tmp_path):
    cfg = fusion.Config(cache_dir=str(tmp_path))
    x = torch.randn(4, 8)
    for _ in range(2):
        m = Counter()
        opt = fusion.optimize(m, (x,), config=cfg)
        assert opt.capture_method == "torch.export"
        assert torch.allclose(opt(x), m(x), atol=1e-6)
    assert not _entries(tmp_path)


def test_a_corrupt_or_stale_entry_is_dropped_quietly(tmp_path):
    cfg = fusion.Config(cache_dir=str(tmp_path))
    x = torch.randn(2, 8, 32)
    fusion.optimize(Block().eval(), (x,), config=cfg)
    (entry,) = _entries(tmp_path)
    raw = json.loads(entry.read_text())
    payload = json.loads(raw["payload"])
    payload["artifact"]["kernels"][0]["name"] = "no_such_kernel"  # consistent checksum, unusable content
    from fusion.store import cache

    cache.write_json(entry, payload)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusionFallbackWarning)
        m = Block().eval()
        opt = fusion.optimize(m, (x,), config=cfg)
    assert opt.capture_method == "torch.export" and _rel(opt(x), m(x)) <= 1e-5
    assert fusion.optimize(Block().eval(), (x,), config=cfg).capture_method == "structural cache"  # rewritten
    entry.write_bytes(entry.read_bytes()[:100])  # truncated: fails its checksum
    assert fusion.optimize(Block().eval(), (x,), config=cfg).capture_method == "torch.export"


def test_replaced_passes_bypass_the_cache(tmp_path, monkeypatch):
    """Tests inject faults by replacing a pass: the cache must not hide the replaced pass."""
    from fusion import pipeline

    cfg = fusion.Config(cache_dir=str(tmp_path))
    x = torch.randn(2, 8, 32)
    fusion.optimize(Block().eval(), (x,), config=cfg)
    assert structural.stock_passes()
    monkeypatch.setattr(pipeline, "normalize", lambda gm: gm)
    assert not structural.stock_passes()
    assert fusion.optimize(Block().eval(), (x,), config=cfg).capture_method == "torch.export"


SECOND_PROCESS = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import fusion
from tests.test_api import Block

def no_export(*a, **k):
    raise AssertionError("torch.export ran")

if sys.argv[3] == "second":
    torch.export.export = no_export  # what fusion.capture.capture_module calls (replacing a fusion pass would
                                     # bypass the structural cache: see test_replaced_passes_bypass_the_cache)
torch.manual_seed(7 if sys.argv[3] == "second" else 3)
m = Block(d=64).eval()
x = torch.randn(2, 16, 64)
opt = fusion.optimize(m, (x,), config=fusion.Config(cache_dir=sys.argv[2]))
err = ((opt(x) - m(x)).abs().max() / m(x).abs().max()).item()
assert err <= 1e-5, err
print(f"SECOND-OK capture={opt.capture_method} kernels={len(opt.graphs[0].log.kernels)}")
"""


def test_a_new_process_skips_capture(tmp_path):
    """Two fresh processes, other weights: the second never calls torch.export (it would raise)."""
    runs = [subprocess.run([sys.executable, "-c", SECOND_PROCESS, ROOT, str(tmp_path), which], capture_output=True,
                           text=True, timeout=600) for which in ("first", "second")]
    for r, capture in zip(runs, ("torch.export", "structural cache")):
        assert r.returncode == 0 and f"SECOND-OK capture={capture}" in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])
        assert "kernels=0" not in r.stdout


def test_a_hit_never_reads_weight_data(tmp_path):
    """The PROT_NONE tripwire of test_weights, twice on one cache: the second optimize is a structural hit
    (its signature traces forward on fake tensors), with every weight unreadable until it returns."""
    from tests.test_weights import TRIPWIRE

    outs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", TRIPWIRE, ROOT, str(tmp_path)], capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0 and "TRIPWIRE-OK" in r.stdout, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
        outs.append(r.stdout)
    assert "capture=torch.export" in outs[0] and "capture=structural cache" in outs[1]


def test_load_runs_no_lowering(tmp_path, monkeypatch):
    from fusion import pipeline
    from fusion import lower

    m = Block().eval()
    x = torch.randn(2, 8, 32)
    fusion.optimize(m, (x,), config=fusion.Config(cache_dir=str(tmp_path / "c"))).save(tmp_path / "prog")

    def forbidden(*a, **k):
        raise AssertionError("load must not lower or compile the graph")

    monkeypatch.setattr(lower, "plan_kernels", forbidden)
    monkeypatch.setattr(pipeline, "compile_graph", forbidden)
    loaded = fusion.load(tmp_path / "prog", config=fusion.Config(cache_dir=str(tmp_path / "c")))
    assert _rel(loaded(x), m(x)) <= 1e-5
    assert loaded.compiled.log.passes[0].name == "loaded" and loaded.compiled.log.kernels
    # another cache directory (another machine's key) never compiles the saved kernels.cpp: it generates the
    # kernels again from the saved graph (lowering, no rewriting)
    monkeypatch.undo()
    (tmp_path / "prog" / "kernels.cpp").write_text("this is not C++")
    fresh = fusion.load(tmp_path / "prog", config=fusion.Config(cache_dir=str(tmp_path / "empty")))
    assert list((tmp_path / "empty" / "kernels").glob("*.so"))
    assert _rel(fresh(x), m(x)) <= 1e-5 and "loaded" not in [p.name for p in fresh.compiled.log.passes]


def test_programs_saved_in_format_1_still_load(tmp_path):
    m = Block().eval()
    x = torch.randn(2, 8, 32)
    fusion.optimize(m, (x,)).save(tmp_path / "prog")
    path = tmp_path / "prog" / "program.json"
    data = json.loads(path.read_text())
    data["format"] = "fusion-program/1"
    for key in ("lowered", "sources", "signature"):   # (format 1 had no signatures)
        data.pop(key)
    path.write_text(json.dumps(data))
    loaded = fusion.load(tmp_path / "prog")
    assert _rel(loaded(x), m(x)) <= 1e-5 and "loaded" not in [p.name for p in loaded.compiled.log.passes]
