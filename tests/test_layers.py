"""The package reads as the pipeline: every import goes down the layer table below, and no module imports
itself back through others (no cycles). Imports inside functions count the same as module-level ones:
a lazy import that goes up is still an upward dependency.

A new module must be placed in LAYERS (the test fails on a module it cannot place)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fusion"

#: top first; a module may import modules of its own layer or any layer below it. The first matching
#: prefix (longest) places a module.
LAYERS: list[tuple[str, ...]] = [
    ("fusion", "fusion.__main__"),                                         # the package face, the CLI
    ("fusion.analysis.analyze", "fusion.analysis.compare", "fusion.analysis.validate"),  # tools built on optimize
    ("fusion.api", "fusion.torch_compile"),                                # optimize / torch.compile backend
    ("fusion.store.program", "fusion.store.structural", "fusion.store.dynamo_cache",
     "fusion.store.repro", "fusion.store.artifact", "fusion.store.weights"),   # programs saved, loaded, cached
    ("fusion.analysis.explain", "fusion.analysis.memory", "fusion.analysis.comparison",
     "fusion.analysis.plots", "fusion.analysis.timing"),                                             # explain / report / plot a program
    ("fusion.pipeline", "fusion.analysis.coverage"),                       # the driver: the passes in order;
                                                                           # the coverage report its rewrite pass records
    ("fusion.approx",),                                                    # opt-in approximate rewrites
    ("fusion.passes",),                                                    # graph passes around lowering
    ("fusion.backends",),                                                  # C++ / Triton: render, build, run
    ("fusion.lower",),                                                     # schedule -> kernel IR + specs
    ("fusion.rewrite",),                                                   # e-graph: insert, saturate, rebuild
    ("fusion.extract",),                                                   # ILP extraction, e-node pricing
    ("fusion.capture",),                                                   # export, normalize
    ("fusion.costmodel",),                                                 # hardware, roofline, calibration
    ("fusion.workloads",),                                                 # built-in blocks and micro cases
    ("fusion.store.cache", "fusion.store.serialize", "fusion.store.trust",
     "fusion.store.bounded"),                 # cache dir, atomic writes, signatures, size limit, graph <-> JSON
    ("fusion.dialect",),                                                   # fused ops, value helpers, graph walks
    ("fusion.config", "fusion.errors", "fusion.progress"),                 # the ground everything stands on
]


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The fusion modules `name` imports, anywhere in its body."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:       # `import fusion.x.y` -> the module that exists
                t = t.rpartition(".")[0]
            if t and t.split(".")[0] == "fusion" and t != name:
                found.add(t)
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def layer(module: str) -> int:
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for pre in prefixes:
            if (module == pre or module.startswith(pre + ".")) and len(pre) > best_len:
                best, best_len = i, len(pre)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py: place it")
    return best


def test_every_module_has_a_layer():
    for m in MODULES:
        layer(m)


def _is_package_of(importer: str, imported: str) -> bool:
    """A package's __init__ may re-export what its own modules define."""
    return imported.startswith(importer + ".")


def test_imports_only_go_down_the_pipeline():
    upward = []
    for m, deps in sorted(GRAPH.items()):
        for d in sorted(deps):
            if layer(d) < layer(m) and not _is_package_of(m, d):
                upward.append(f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})")
    assert not upward, "imports that go up the pipeline:\n  " + "\n  ".join(upward)


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycles():
    # the package face imports everything; the modules below never import it back
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("source, upward", [
    ("from fusion.pipeline import compile_graph\n", True),
    ("from fusion.config import Config\n", False),
])
def test_the_check_sees_an_upward_import(tmp_path, source, upward):
    """The checker itself: a costmodel module importing the driver is flagged; importing config is not."""
    p = tmp_path / "probe.py"
    p.write_text(source)
    deps = _imports("fusion.costmodel.probe", p)
    assert any(layer(d) < layer("fusion.costmodel.probe") for d in deps) is upward
