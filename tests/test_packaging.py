"""pyproject.toml matches the layout: every folder of fusion/ ships, py.typed ships, the entry points resolve,
and each extra holds what its name says (the `test` extra only what fusion/, tests/ or notebooks/ use)."""
from __future__ import annotations

import importlib
import json
import re
import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]

#: in the `test` extra although nothing imports them by name: what each is for
RUN_TIME_ONLY = {
    "ipykernel": "the python3 kernel nbclient runs the notebooks in (tests/test_notebooks.py)",
    "expecttest": "imported by torch.testing._internal, whose op_db tests/test_opsweep.py sweeps",
}


def _name(requirement: str) -> str:
    """'transformers>=4.40' -> 'transformers'; 'fusion[plot,gpu]' -> 'fusion'."""
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()


def _sources() -> str:
    """The text of every Python file and notebook code cell in fusion/, tests/ and notebooks/."""
    texts = []
    for folder in ("fusion", "tests", "notebooks"):
        for path in (ROOT / folder).rglob("*.py"):
            texts.append(path.read_text())
        for path in (ROOT / folder).rglob("*.ipynb"):
            cells = json.loads(path.read_text())["cells"]
            texts += ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    return "\n".join(texts)


def test_every_folder_of_the_package_ships():
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    found = set(find_packages(str(ROOT), include=include))
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fusion").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert folders <= found, sorted(folders - found)
    assert all(p.split(".")[0] == "fusion" for p in found), sorted(found)


def test_py_typed_ships():
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["fusion"]
    assert (ROOT / "fusion" / "py.typed").is_file()


def test_entry_points_resolve():
    targets = list(PYPROJECT["project"]["scripts"].values())
    targets += list(PYPROJECT["project"]["entry-points"]["torch_dynamo_backends"].values())
    for target in targets:
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), target


def test_extras_hold_what_their_names_say():
    assert EXTRAS["plot"] == ["matplotlib"]
    assert EXTRAS["gpu"] == ["triton"]
    assert sorted(EXTRAS["peers"]) == ["onnx", "onnxruntime", "onnxscript", "openvino"]
    assert EXTRAS["bench"] == ["fusion[peers]", "pytest-benchmark"]   # bench/test_peers.py: peers + its fixture
    assert "fusion[plot,gpu]" in EXTRAS["test"]          # the test suite draws plots and runs triton
    names = {_name(r) for reqs in EXTRAS.values() for r in reqs}
    assert "torch" not in names                         # only the base dependency names torch


def test_the_test_extra_holds_only_what_is_used():
    sources = _sources()
    for requirement in EXTRAS["test"]:
        name = _name(requirement)
        if name == "fusion" or name in RUN_TIME_ONLY:
            continue
        module = name.replace("-", "_")
        used = re.search(rf"^\s*(import|from) {module}\b|importorskip\(\"{module}\b", sources, re.M)
        assert used, f"{requirement} is in the test extra but nothing in fusion/, tests/ or notebooks/ imports it"


def test_the_peer_extras_are_used_by_bench():
    """Each package of the `peers` and `bench` extras is imported by bench/ (bench/peers.py loads the peers
    through _require, which reports a missing one as PeerMissing; bench/test_peers.py importorskips
    pytest_benchmark)."""
    sources = "\n".join(p.read_text() for p in (ROOT / "bench").glob("*.py"))
    for requirement in EXTRAS["peers"] + EXTRAS["bench"]:
        name = _name(requirement)
        if name == "fusion":
            continue
        module = name.replace("-", "_")
        used = re.search(rf"^\s*(import|from) {module}\b|(importorskip|_require)\(\"{module}\b", sources,
                         re.MULTILINE)
        assert used, f"{requirement} is in the {'bench' if requirement in EXTRAS['bench'] else 'peers'} extra " \
                     "but nothing in bench/ imports it"


def test_make_setup_installs_the_test_extra():
    assert '-e ".[test]"' in (ROOT / "Makefile").read_text()
