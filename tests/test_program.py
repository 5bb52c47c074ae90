"""Graph serialisation, the rewrite cache, saved programs (mmapped weights) and weight-free reproducers."""
import json
import os

import pytest
import torch

import fusion
from fusion.store import cache
from fusion.store import repro
from fusion.store import serialize
from fusion.capture import capture_module
from fusion.store.weights import load_safetensors_mmap, save_safetensors
from tests.test_api import Block


def _placeholder_vals(gm):
    return [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]


def test_graph_round_trip_keeps_structure_and_key():
    m = Block().eval()
    cap = capture_module(m, (torch.randn(2, 8, 32),))
    data = serialize.graph_to_dict(cap.gm)
    assert "tensor(" not in json.dumps(data)  # structure only, never data
    again = serialize.graph_from_dict(json.loads(json.dumps(data)), _placeholder_vals(cap.gm))
    assert serialize.graph_key(again) == serialize.graph_key(cap.gm)
    assert serialize.graph_key(cap.gm, "config-a") != serialize.graph_key(cap.gm, "config-b")


def test_cache_entries_are_checksummed(tmp_path):
    p = tmp_path / "entry.json"
    cache.write_json(p, {"a": 1})
    assert cache.read_json(p) == {"a": 1}
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])  # truncated
    assert cache.read_json(p) is None
    entry = json.loads(raw)
    entry["payload"] = entry["payload"].replace("1", "2")  # corrupted payload, stale checksum
    p.write_text(json.dumps(entry))
    assert cache.read_json(p) is None


def test_cache_dir_is_private(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_CACHE_DIR", str(tmp_path / "c"))
    d = cache.cache_dir()
    assert d == tmp_path / "c" and (d.stat().st_mode & 0o077) == 0


def test_atomic_path_renames_whole_files_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "k.so"
    with pytest.raises(RuntimeError):
        with cache.atomic_path(target) as tmp:     # as a compiler fills it: fails half way
            tmp.write_bytes(b"half")
            raise RuntimeError("compiler failed")
    assert list(tmp_path.iterdir()) == []           # neither the target nor the temporary
    cache.atomic_write(target, b"whole")
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]
    assert (target.stat().st_mode & 0o077) == 0


def test_rewrite_cache_keys_on_the_hardware_profile(tmp_path):
    """A re-calibrated machine re-extracts: rewrites priced under the old profile are not reused."""
    import dataclasses

    from fusion import pipeline
    from fusion.extract.pricing import DEFAULT_PROFILE

    gm = capture_module(Block().eval(), (torch.randn(2, 8, 32),)).gm
    cfg = fusion.Config(cache_dir=str(tmp_path))
    recalibrated = dataclasses.replace(DEFAULT_PROFILE, source="calibrated again")
    assert pipeline._rewrite(gm, cfg, DEFAULT_PROFILE).stats.get("cache") != "hit"
    assert pipeline._rewrite(gm, cfg, DEFAULT_PROFILE).stats.get("cache") == "hit"
    assert pipeline._rewrite(gm, cfg, recalibrated).stats.get("cache") != "hit"
    assert len(list((tmp_path / "graphs").glob("*.json"))) == 2


def test_rewrite_cache_hit_in_second_compile(tmp_path, assert_close):
    cfg = fusion.Config(cache_dir=str(tmp_path), structural_cache=False)  # capture runs; the graph cache hits
    m = Block().eval()
    x = torch.randn(2, 8, 32)
    fusion.optimize(m, (x,), config=cfg)
    other = Block().eval()  # same architecture, other weights
    opt = fusion.optimize(other, (x,), config=cfg)
    assert opt.graphs[0].log.rewrite_stats.get("cache") == "hit"
    assert_close(opt(x), other(x))
    entries = list((tmp_path / "graphs").glob("*.json"))
    assert entries and all(b"tensor(" not in e.read_bytes() for e in entries)


def test_safetensors_writer_and_mmap_reader(tmp_path):
    tensors = {"w": torch.randn(64, 32), "idx": torch.arange(7), "t": torch.randn(5, 3).t(), "h": torch.randn(4).half()}
    path = tmp_path / "w.safetensors"
    save_safetensors(tensors, path)
    back = load_safetensors_mmap(path)
    for k, v in tensors.items():
        assert torch.equal(back[k], v)
    st = pytest.importorskip("safetensors.torch")
    for k, v in st.load_file(str(path)).items():  # the standard reader agrees with our writer
        assert torch.equal(v, tensors[k])


def test_save_and_load(tmp_path, assert_close):
    m = Block().eval()
    x = torch.randn(2, 8, 32)
    opt = fusion.optimize(m, (x,))
    opt.save(tmp_path / "prog")
    names = sorted(os.listdir(tmp_path / "prog"))
    assert names == ["kernels.cpp", "program.json", "program.py", "weights.safetensors"]
    loaded = fusion.load(tmp_path / "prog")
    assert_close(loaded(x), m(x))
    assert "def forward" in loaded.code


def test_repro_replays_to_the_same_decisions(tmp_path):
    m = Block().eval()
    opt = fusion.optimize(m, (torch.randn(2, 8, 32),))
    path = repro.dump(opt, tmp_path / "r.json")
    assert path.stat().st_size < 1_000_000
    result = repro.replay(path)
    assert result.same_decisions, str(result)
    assert result.max_rel_error <= 1e-4
