"""Saved programs: `OptimizedModule.save(dir)` and `fusion.load(dir)`.

A saved program is a directory:
    program.json         the rewritten graph (structure, shapes, dtypes — no weight data), how each
                         placeholder is bound (weight name or user input), the output structure, the config,
                         and the lowered program (fusion/store/artifact.py: the graph of kernel and ATen calls,
                         each kernel's call specification)
    kernels.cpp          the C++ source of the kernels (readable; compiled only if this machine's kernel
                         cache does not hold the library built from it)
    program.py           the rewritten program as readable Python (for people; not executed)
    weights.safetensors  parameters, buffers and constants by name, written tensor by tensor
Loading does no capture, rewriting, scheduling or code generation: it memory-maps the weights (nothing
is read until used), binds the kernels from the kernel cache and rebuilds the lowered graph. Directories
written before the lowered program was stored (format 1), or whose kernels cannot be restored, are
recompiled from the rewritten graph instead.

Trust (fusion/store/trust.py): a program directory is data from wherever it came from. Loading never
unpickles, never takes the compiler or the cache directory from the file, and calls only allowlisted ops
(fusion/store/serialize.py). program.json records the key id of the cache directory that saved it and
signatures of itself and of each kernels*.cpp; kernel sources are compiled only when they verify under this
machine's key. A directory signed elsewhere (another machine or user) has its kernels generated again from
its graph, and its kernels*.cpp is not read; one that claims this machine's key but does not verify was
modified after it was saved and is refused (`FusionInputError` naming the file), as is a graph naming an op
outside the allowlist, a source file name that is not a plain kernels*.cpp, a binding to a weight the
weights file lacks, or a truncated weights file.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
import torch.utils._pytree as pytree

from fusion.config import Config
from fusion.errors import FusionInputError
from fusion.store import cache, trust
from fusion.store.serialize import UnsafeGraphError, fake_placeholders, graph_from_dict, graph_to_dict
from fusion.store.weights import load_safetensors_mmap, save_safetensors

if TYPE_CHECKING:  # annotations only (the driver itself is imported when a program is recompiled)
    from fusion.capture import Captured
    from fusion.pipeline import CompiledGraph

FORMAT = "fusion-program/2"
READS = ("fusion-program/1", FORMAT)
#: config fields that describe the machine, not the program: a loaded program never takes them from its file
#: (a file naming the compiler or the cache directory would choose what runs)
MACHINE_FIELDS = ("cache_dir", "cache_limit_mb", "cxx", "num_threads")
SOURCE_NAME = re.compile(r"kernels(_[0-9]+)?\.cpp")
log = logging.getLogger("fusion.store.program")


class SavableProgram(Protocol):
    """What save_program reads of a `fusion.OptimizedModule` (fusion/api.py is a layer above this module,
    so it is described here rather than imported)."""

    original: torch.nn.Module
    config: Config
    capture_method: str
    capture_note: str
    graphs: list[CompiledGraph]
    captured: Captured | None
    accessors: list[Callable[[], torch.Tensor] | None]


def save_program(opt: SavableProgram, path: str | Path) -> Path:
    """Write `opt`'s first graph, bindings, config, lowered program and weights to directory `path`
    (the layout in the module docstring); returns that directory."""
    from fusion.store import artifact

    if opt.captured is None or not opt.graphs:
        raise FusionInputError(
            "only programs captured whole by torch.export can be saved; this model was captured by "
            f"{opt.capture_method!r}{opt.capture_note}. Make the model exportable (e.g. return plain tensors) to save it."
        )
    cap = opt.captured
    graph = opt.graphs[0]
    if graph.log.approx is not None:
        raise FusionInputError(
            "saving a program with approximate rewrites (Config.approximate) is not supported yet: its "
            "weights were converted in place (int8/bf16) and its graph holds quantization constants. Save the "
            "exact program (optimize without `approximate`) or keep this optimized module in memory.")
    try:
        graph_dict = graph_to_dict(graph.program_gm)
    except TypeError as e:
        raise FusionInputError(f"this program cannot be saved: {e}") from None
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    weights = {}
    for (kind, name), acc in zip(cap.input_bindings, opt.accessors):
        if acc is not None:
            weights[name] = acc()
    save_safetensors(weights, out / "weights.safetensors")
    try:
        out_spec = artifact.dump_spec(cap.out_spec)
    except TypeError as e:
        raise FusionInputError(str(e)) from None
    cfg = {k: (sorted(v) if isinstance(v, frozenset) else v) for k, v in opt.config.__dict__.items()}
    program = {
        "format": FORMAT,
        "model": type(opt.original).__name__,
        "graph": graph_dict,
        "bindings": cap.input_bindings,
        "buffer_mutations": {str(k): v for k, v in cap.buffer_mutations.items()},
        "out_spec": out_spec,
        "config": cfg,
        "fired": graph.log.fired,
    }
    try:
        dumped = artifact.dump(graph)
    except (OSError, TypeError, ValueError) as e:  # e.g. the kernel cache was cleaned: load will recompile
        log.debug("save %s: lowered program not stored (%s: %s)", out, type(e).__name__, e)
        dumped = None
    for old in out.glob("kernels*.cpp"):
        old.unlink()
    sources: list[str] = []
    if dumped is not None:
        lowered, sources = dumped
        lowered = {k: v for k, v in lowered.items() if k not in ("program", "source")}  # "graph" above
        program["lowered"] = lowered
        program["sources"] = [f"kernels{'_%d' % i if i else ''}.cpp" for i in range(len(sources))]
        for name, text in zip(program["sources"], sources):
            (out / name).write_text(text)
    root = cache.cache_dir(opt.config.cache_dir)
    program["signature"] = {"key": trust.key_id(root), "program": trust.sign([_canonical(program)], root),
                            "sources": [trust.sign([text.encode()], root) for text in sources]}
    (out / "program.json").write_text(json.dumps(program, indent=1))
    (out / "program.py").write_text(f"# {type(opt.original).__name__}, optimized by fusion (rewritten graph)\n"
                                    + graph.program_gm.code)
    return out


class LoadedProgram(torch.nn.Module):
    """A saved program, callable with the model's user inputs; weights stay memory-mapped."""

    def __init__(self, path: str | Path, config: Config | None = None) -> None:
        super().__init__()
        path = Path(path)
        data = _read_program(path)
        self.weights = load_safetensors_mmap(path / "weights.safetensors")
        self.bindings: list[tuple[str, str]] = [(kind, name) for kind, name in data["bindings"]]
        missing = [name for kind, name in self.bindings if kind != "user" and name not in self.weights]
        self.buffer_mutations: dict[int, str] = {int(k): v for k, v in data["buffer_mutations"].items()}
        missing += [v for v in self.buffer_mutations.values() if v not in self.weights]
        if missing:
            raise FusionInputError(f"{path / 'program.json'} binds {missing[:3]} to weights that "
                                   f"{path / 'weights.safetensors'} does not hold")
        self._out_spec_data: dict[str, Any] = data["out_spec"]
        self._out_spec: pytree.TreeSpec | None = None
        self._path = path
        saved = dict(data["config"])
        saved["rewrites"] = False  # the saved graph is already rewritten
        known = set(Config.__dataclass_fields__) - set(MACHINE_FIELDS)
        fields: dict[str, Any] = {k: (frozenset(v) if isinstance(v, list) else v)
                                  for k, v in saved.items() if k in known}
        try:
            self.config: Config = config or Config(**fields)
        except (TypeError, ValueError) as e:
            raise FusionInputError(f"{path / 'program.json'}: its config does not load ({e})") from None
        signed_here = _signed_here(path, data, self.config)
        try:
            restored = _restored(path, data, self.config) if signed_here else None
            self.compiled: CompiledGraph = restored if restored is not None else _recompiled(data, self.config)
        except UnsafeGraphError as e:
            raise FusionInputError(f"{path / 'program.json'} is refused: {e}; nothing of it was run") from None

    @property
    def out_spec(self) -> pytree.TreeSpec:
        """The output structure, resolved on first use: it may name a model's output class (HF's
        ModelOutput), whose library is imported then rather than by load()."""
        if self._out_spec is None:
            from fusion.store.artifact import load_spec

            try:
                self._out_spec = load_spec(self._out_spec_data)
            except (TypeError, ValueError) as e:
                raise FusionInputError(f"{self._path / 'program.json'}: the output structure does not load ({e})") from None
        return self._out_spec

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        user = iter(pytree.tree_leaves((args, kwargs)))
        flat = [next(user) if kind == "user" else self.weights[name] for kind, name in self.bindings]
        with torch.no_grad():
            outs = self.compiled(*flat)
        if self.buffer_mutations:
            for i, target in self.buffer_mutations.items():
                self.weights[target].copy_(outs[i])
            outs = [o for i, o in enumerate(outs) if i not in self.buffer_mutations]
        return pytree.tree_unflatten(list(outs), self.out_spec)

    @property
    def code(self) -> str:
        """The loaded program as Python (fused-kernel calls and ATen calls)."""
        return self.compiled.code


def _canonical(program: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in program.items() if k != "signature"}, sort_keys=True).encode()


def _read_program(path: Path) -> dict[str, Any]:
    """program.json of `path`, checked for what loading relies on before anything of it is used."""
    file = path / "program.json"
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise FusionInputError(f"{file} is not a fusion program ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or data.get("format") not in READS:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise FusionInputError(f"{path} is not a fusion program directory (format {got!r})")
    bad = [n for n in data.get("sources", []) if not (isinstance(n, str) and SOURCE_NAME.fullmatch(n))]
    if bad:
        raise FusionInputError(f"{file} names kernel sources {bad[:3]}: only kernels*.cpp in the program "
                               f"directory itself are read")
    return data


def _signed_here(path: Path, data: dict[str, Any], config: Config) -> bool:
    """True when `data` was saved under this machine's cache key and verifies (its kernel sources may be
    compiled); False when it was saved elsewhere (its kernels are generated again). Raises FusionInputError
    when it claims this machine's key and does not verify: it was modified after it was saved."""
    sig = data.get("signature")
    root = cache.cache_dir(config.cache_dir)
    if not isinstance(sig, dict) or sig.get("key") != trust.key_id(root):
        log.info("load %s: saved elsewhere (not under this machine's key): kernels generated again", path)
        return False
    if not trust.verify([_canonical(data)], sig.get("program"), root):
        raise FusionInputError(f"{path / 'program.json'} was modified after it was saved (its signature does not "
                               f"verify); refused, nothing of it was run. Save the program again.")
    sources = data.get("sources", [])
    sigs = sig.get("sources") if isinstance(sig.get("sources"), list) else []
    for i, name in enumerate(sources):
        text = (path / name).read_bytes() if (path / name).is_file() else b""
        if i >= len(sigs) or not trust.verify([text], sigs[i], root):
            raise FusionInputError(f"{path / name} was modified after it was saved (its signature does not "
                                   f"verify); refused, nothing of it was compiled. Save the program again.")
    return True


def _restored(path: Path, data: dict[str, Any], config: Config) -> CompiledGraph | None:
    """The stored lowered program of `data` (program.json in `path`) with its kernels bound, or None when
    there is none, the config asks for another backend, or it cannot be restored."""
    if "lowered" not in data or config.codegen not in ("auto", "cpp"):
        return None
    from fusion.store import artifact

    try:
        sources = [(path / name).read_text() for name in data["sources"]]
        return artifact.restore({**data["lowered"], "program": data["graph"], "source": None},
                                sources, config, how="loaded")
    except UnsafeGraphError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. no compiler for a missing kernel library: recompile
        log.debug("load %s: lowered program not restored (%s: %s); recompiling", path, type(e).__name__, e)
        return None


def _recompiled(data: dict[str, Any], config: Config) -> CompiledGraph:
    """Compile the saved rewritten graph of `data` again (format 1, or a lowered program not restored)."""
    from fusion.pipeline import compile_graph

    try:
        gm = graph_from_dict(data["graph"], fake_placeholders(data["graph"]))
    except UnsafeGraphError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UnsafeGraphError(f"its graph is malformed ({type(e).__name__}: {e})") from None
    return compile_graph(gm, config, label="forward", inference=True)


def load(path: str | Path, config: Config | None = None) -> LoadedProgram:
    """Load a program saved with `OptimizedModule.save(path)`; weights are memory-mapped, not read, and
    nothing is recompiled (see the module docstring)."""
    return LoadedProgram(path, config)
