"""The cache directory stays under its size limit (least recently used first), and `python -m fusion cache`."""
import os
import time

import pytest
import torch

import fusion
from fusion.__main__ import main as cli
from fusion.config import ConfigError
from fusion.store import bounded, cache


def _file(path, nbytes, age_s):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * nbytes)
    t = time.time() - age_s
    os.utime(path, (t, t))


def test_eviction_takes_the_least_recently_used_and_keeps_key_and_profiles(tmp_path):
    root = cache.cache_dir(str(tmp_path))
    _file(root / "profiles" / "p.json", 4000, 9000)
    _file(root / "graphs" / "old.json", 1000, 5000)
    for ext in (".cpp", ".so", ".sig"):          # one kernel library: its three files go together
        _file(root / "kernels" / f"k1{ext}", 1000, 4000)
    _file(root / "kernels" / "k2.so", 1000, 10)
    _file(root / "modules" / "new.json", 1000, 1)
    removed, freed = bounded.evict(root, limit=4000)
    assert (removed, freed) == (2, 4000)
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert left == ["kernels/k2.so", "modules/new.json", "profiles/p.json", "trust.key"]
    assert bounded.evict(root, limit=4000) == (0, 0)       # at or under the limit: nothing to do


def test_a_read_marks_an_entry_used(tmp_path):
    root = cache.cache_dir(str(tmp_path))
    a, b = cache.subdir("graphs", str(root)) / "a.json", root / "graphs" / "b.json"
    cache.write_json(a, {"v": "a" * 3000})
    cache.write_json(b, {"v": "b" * 3000})
    for p in (a, b):
        os.utime(p, (time.time() - 100, time.time() - 100))
    assert cache.read_json(a) is not None        # a is now the most recently used
    bounded.evict(root, limit=5000)
    assert a.exists() and not b.exists()


def test_compiles_keep_the_directory_under_a_small_limit(tmp_path):
    cfg = fusion.Config(cache_dir=str(tmp_path), cache_limit_mb=0.2)
    limit = bounded.limit_bytes(0.2)
    bounded._scanned.discard(str(tmp_path))
    for n in (8, 16, 24, 40, 56):
        m = torch.nn.Sequential(torch.nn.Linear(n, n), torch.nn.GELU(), torch.nn.LayerNorm(n)).eval()
        x = torch.randn(3, n)
        opt = fusion.optimize(m, (x,), config=cfg)
        assert ((opt(x) - m(x)).abs().max() / m(x).abs().max()) <= 1e-5
        total = sum(b for _, b in bounded.usage(tmp_path).values())
        assert total <= limit + 2 * bounded.RESCAN_FRACTION * limit + 300_000, total   # one compile's writes of slack
    assert sum(b for _, b in bounded.usage(tmp_path).values()) <= limit + 300_000


def test_the_limit_is_checked():
    with pytest.raises(ConfigError, match="cache_limit_mb"):
        fusion.Config(cache_limit_mb=0)
    assert fusion.Config(cache_limit_mb=10).key() == fusion.Config().key()    # never changes the program


def test_cache_info_and_clear(tmp_path, capsys):
    root = cache.cache_dir(str(tmp_path))
    _file(root / "graphs" / "g.json", 2 << 20, 0)
    _file(root / "profiles" / "p.json", 10, 0)
    assert cli(["cache", "info", "--dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "graphs" in out and "2.0 MB" in out
    assert cli(["cache", "clear", "--dir", str(root)]) == 0
    assert not (root / "graphs").exists() and (root / "profiles" / "p.json").exists() and (root / "trust.key").exists()
    assert cli(["cache", "clear", "--all", "--dir", str(root)]) == 0
    assert not (root / "profiles").exists() and (root / "trust.key").exists()


def test_torch_process_caches_stay_bounded(monkeypatch):
    """Every compile adds GraphModule sources (for tracebacks) and fake-dispatch entries to torch's
    process-wide caches; after a compile only the newest are kept."""
    import linecache

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx import graph_module as fxgm

    from fusion import pipeline

    monkeypatch.setattr(pipeline, "FX_SOURCES_KEPT", 5)
    monkeypatch.setattr(pipeline, "FAKE_DISPATCH_KEPT", 10)
    for _ in range(12):
        torch.fx.symbolic_trace(torch.nn.Linear(2, 2))        # each generates (and caches) a source
    before = list(fxgm._loader.eval_cache)
    stale = [("stale-dispatch-entry", i) for i in range(100)]
    FakeTensorMode.cache.update(dict.fromkeys(stale))
    fusion.optimize(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).eval(), (torch.randn(2, 8),),
                    config=fusion.Config(structural_cache=False))
    dropped = [k for k in before if k not in fxgm._loader.eval_cache]
    assert len(fxgm._loader.eval_cache) == 5 and len(dropped) >= 12
    assert not any(k in linecache.cache for k in dropped)          # their traceback lines went with them
    assert not any(k in FakeTensorMode.cache for k in stale)        # past its bound the dispatch cache was cleared


@pytest.mark.slow
def test_soak_two_thousand_compiles_keep_memory_flat_and_the_cache_bounded(tmp_path):
    from bench.soak import main as soak

    assert soak(["--compiles", "2000", "--limit-mb", "16", "--cache-dir", str(tmp_path)]) == 0
