"""Hostile program directories and cache entries: each is refused (or its code replaced by code generated
here), and a canary file that the hostile payload would write if it ran is never written.

The trust model is in fusion/store/trust.py: only what this machine signed is compiled or loaded, graphs call
allowlisted ops only, output structures are JSON, the compiler and the cache directory never come from a file.
"""
import base64
import json
import pickle
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

import fusion
from fusion.backends.cpp import compiler
from fusion.errors import FusionInputError
from fusion.store import serialize
from tests.test_api import Block


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _evil_cpp(canary: Path) -> str:
    """C++ whose library writes the canary as soon as it is loaded (a constructor)."""
    return (f'#include <cstdio>\n__attribute__((constructor)) static void fusion_evil() {{ '
            f'FILE* f = std::fopen("{canary}", "w"); if (f) {{ std::fputs("ran", f); std::fclose(f); }} }}\n')


class _Canary:
    """Unpickling it writes the canary."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "ran"))


@pytest.fixture(scope="module")
def _base(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    cfg = fusion.Config(cache_dir=str(root / "c"))
    m, x = Block().eval(), torch.randn(2, 8, 32)
    fusion.optimize(m, (x,), config=cfg).save(root / "prog")
    return m, x, root / "prog", cfg


@pytest.fixture
def saved(_base, tmp_path):
    """(model, input, program dir, config): a copy of one small program saved under the module's cache dir."""
    m, x, prog, cfg = _base
    shutil.copytree(prog, tmp_path / "prog")
    return m, x, tmp_path / "prog", cfg


def _edit(prog: Path, change, keep_signature: bool = False) -> None:
    path = prog / "program.json"
    data = json.loads(path.read_text())
    change(data)
    if not keep_signature:
        data.pop("signature", None)   # what a program from elsewhere looks like
    path.write_text(json.dumps(data))


def test_the_program_saved_here_loads_signed_and_fast(saved):
    m, x, prog, cfg = saved
    loaded = fusion.load(prog, config=cfg)
    assert loaded.compiled.log.passes[0].name == "loaded" and _rel(loaded(x), m(x)) <= 1e-5


def test_edited_kernel_source_signed_here_is_refused(saved, tmp_path):
    m, x, prog, cfg = saved
    canary = tmp_path / "canary"
    with open(prog / "kernels.cpp", "a") as f:
        f.write(_evil_cpp(canary))
    with pytest.raises(FusionInputError, match="kernels.cpp was modified"):
        fusion.load(prog, config=cfg)
    assert not canary.exists()


def test_edited_program_json_signed_here_is_refused(saved):
    m, x, prog, cfg = saved
    _edit(prog, lambda d: d["config"].update(tolerance=0.5), keep_signature=True)
    with pytest.raises(FusionInputError, match="program.json was modified"):
        fusion.load(prog, config=cfg)


def test_a_program_from_elsewhere_never_compiles_its_sources(saved, tmp_path):
    """No signature of this machine: kernels.cpp is never read; the kernels are generated again from the graph."""
    m, x, prog, cfg = saved
    canary = tmp_path / "canary"
    (prog / "kernels.cpp").write_text(_evil_cpp(canary))
    _edit(prog, lambda d: None)
    loaded = fusion.load(prog, config=cfg)
    assert _rel(loaded(x), m(x)) <= 1e-5 and not canary.exists()
    assert "loaded" not in [p.name for p in loaded.compiled.log.passes]


def test_the_compiler_and_cache_dir_never_come_from_the_file(saved, tmp_path):
    m, x, prog, cfg = saved
    canary = tmp_path / "canary"
    evil_dir = tmp_path / "evil-cache"

    def change(d):
        d["config"]["cxx"] = f"sh -c 'touch {canary}'; false"
        d["config"]["cache_dir"] = str(evil_dir)
    _edit(prog, change)
    loaded = fusion.load(prog)
    assert _rel(loaded(x), m(x)) <= 1e-5
    assert not canary.exists() and not evil_dir.exists()
    assert loaded.config.cxx is None and loaded.config.cache_dir is None


def test_a_pickled_output_structure_is_never_unpickled(saved, tmp_path):
    m, x, prog, cfg = saved
    canary = tmp_path / "canary"
    payload = base64.b64encode(pickle.dumps(_Canary(str(canary)))).decode()
    _edit(prog, lambda d: d.update(out_spec={"pickle": payload}))
    loaded = fusion.load(prog, config=cfg)
    with pytest.raises(FusionInputError, match="pickle"):
        loaded(x)
    assert not canary.exists()


@pytest.mark.parametrize("target", ["py:os.system", "py:builtins.exec", "py:fusion.store.cache.atomic_write",
                                    "aten::from_file.default", "evil::op.default", "c10d::barrier.default"])
def test_a_graph_calling_what_it_may_not_is_refused(saved, tmp_path, target):
    m, x, prog, cfg = saved
    canary = tmp_path / "canary"

    def change(d):
        for node in d["graph"]["nodes"]:
            if node["op"] == "call_function":
                node["target"] = target
                node["args"] = {"t": [f"touch {canary}"]}
                break
    _edit(prog, change)
    with pytest.raises(FusionInputError, match="may not call|does not have"):
        fusion.load(prog, config=cfg)
    assert not canary.exists()


@pytest.mark.parametrize("op", ["call_method", "get_attr", "call_module"])
def test_a_graph_with_other_node_kinds_is_refused(saved, op):
    m, x, prog, cfg = saved

    def change(d):
        node = next(n for n in d["graph"]["nodes"] if n["op"] == "call_function")
        node["op"], node["target"] = op, "__reduce__"
    _edit(prog, change)
    with pytest.raises(FusionInputError, match="may not hold"):
        fusion.load(prog, config=cfg)


@pytest.mark.parametrize("name", ["../kernels.cpp", "/etc/passwd", "kernels.cpp/../../x.cpp", "weights.safetensors"])
def test_source_names_outside_the_directory_are_refused(saved, name):
    m, x, prog, cfg = saved
    _edit(prog, lambda d: d.update(sources=[name]))
    with pytest.raises(FusionInputError, match="only kernels"):
        fusion.load(prog, config=cfg)


def test_a_binding_to_a_missing_weight_is_refused(saved):
    m, x, prog, cfg = saved

    def change(d):
        i = next(i for i, (kind, _) in enumerate(d["bindings"]) if kind != "user")
        d["bindings"][i][1] = "../../etc/passwd"
    _edit(prog, change)
    with pytest.raises(FusionInputError, match="does not hold"):
        fusion.load(prog, config=cfg)


@pytest.mark.parametrize("cut", [4, 200, -8])
def test_a_truncated_weights_file_is_refused(saved, cut):
    m, x, prog, cfg = saved
    path = prog / "weights.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[:cut])
    with pytest.raises(FusionInputError, match="weights.safetensors"):
        fusion.load(prog, config=cfg)


def test_a_swapped_kernel_library_is_never_loaded(tmp_path):
    """A .so replaced in the kernel cache: `load` refuses it, and the next build rebuilds it (with a warning)."""
    cfg = fusion.Config(cache_dir=str(tmp_path / "c"))
    m, x, prog = Block().eval(), torch.randn(2, 8, 32), tmp_path / "prog"
    fusion.optimize(m, (x,), config=cfg).save(prog)
    canary = tmp_path / "canary"
    evil_src = tmp_path / "evil.cpp"
    evil_src.write_text(_evil_cpp(canary))
    (so,) = (tmp_path / "c" / "kernels").glob("*.so")
    subprocess.run(["g++", "-shared", "-fPIC", str(evil_src), "-o", str(so)], check=True)
    compiler._loaded.pop(str(so), None)
    with pytest.raises(compiler.UntrustedLibraryError):
        compiler.load(str(so))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = fusion.load(prog, config=cfg)
        assert _rel(loaded(x), m(x)) <= 1e-5
    assert not canary.exists()
    assert any("does not match the build recorded" in str(w.message) for w in caught)


def test_an_edited_cache_entry_with_a_consistent_checksum_is_a_miss(tmp_path):
    """Anyone can recompute a sha256; only the cache directory's key signs: the structural entry below carries
    a hostile kernel source and a correct checksum, and is never used."""
    import hashlib

    cfg = fusion.Config(cache_dir=str(tmp_path))
    m, x = Block().eval(), torch.randn(2, 8, 32)
    fusion.optimize(m, (x,), config=cfg)
    (entry,) = (tmp_path / "modules").glob("*.json")
    payload = json.loads(json.loads(entry.read_text())["payload"])
    canary = tmp_path / "canary"
    payload["sources"][0] += _evil_cpp(canary)
    body = json.dumps(payload, sort_keys=True)
    entry.write_text(json.dumps({"sha256": hashlib.sha256(body.encode()).hexdigest(), "payload": body,
                                 "hmac": "0" * 64}))
    opt = fusion.optimize(Block().eval(), (x,), config=cfg)
    assert opt.capture_method == "torch.export" and not canary.exists()


def test_every_allowlisted_callable_resolves():
    for name in sorted(serialize.SAFE_CALLABLES):
        assert callable(serialize._resolve_target(name)), name
