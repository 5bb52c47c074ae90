"""A compiled program as data, and back, without compiling anything: what saved programs and the
structural cache store so that `fusion.load` and a structural-cache hit do no capture, rewriting,
scheduling or code generation.

    data, sources = dump(compiled)        # None when the program cannot be stored this way
    compiled = restore(data, sources, config)

`data` is JSON-able: the lowered graph (kernel calls + ATen calls: ops, argument structure, shapes,
dtypes), each kernel's name, call specification (`KernelSpec`) and report figures, the rewritten
graph (the fallback if a kernel fails at run time) and the captured graph (for reproducers). `sources`
are the C++ sources of the kernel libraries. Restoring compiles nothing when the kernel cache already
holds the library built from the same source (its key is the source's hash + flags + compiler): it is
loaded and its functions bound; otherwise the stored source is compiled once. No weight data is in
either: weights stay placeholders bound by name (seed 000).

Only C++ kernels are stored; a program with Triton kernels or graph constants (`get_attr`) is not
(`dump` returns None) and is rebuilt the usual way.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fusion.store import cache
from fusion.backends.cpp import compiler as kernel_cache
from fusion.backends.cpp import runtime
from fusion.config import Config
from fusion.pipeline import CompiledGraph, CompileLog, PassRecord
from fusion.store.serialize import fake_placeholders, graph_from_dict, graph_to_dict
from fusion.lower.specs import InputSpec, KernelSpec

FORMAT = "fusion-artifact/1"


# ------------------------------------------------------------------------------------- kernel specs
def _spec_to_dict(spec: KernelSpec) -> dict:
    return {
        "R": spec.R,
        "dsrc": [list(d) for d in spec.dsrc],
        "inputs": [dataclasses.asdict(i) for i in spec.inputs],
        "outputs": [[form, str(dtype).removeprefix("torch.")] for form, dtype in spec.outputs],
        "flatten": spec.flatten,
        "pointwise": spec.pointwise,
    }


def _spec_from_dict(d: dict) -> KernelSpec:
    return KernelSpec(
        R=d["R"],
        dsrc=[tuple(x) for x in d["dsrc"]],
        inputs=[InputSpec(**i) for i in d["inputs"]],
        outputs=[(form, getattr(torch, dtype)) for form, dtype in d["outputs"]],
        flatten=d["flatten"],
        pointwise=d.get("pointwise", False),
    )


# ------------------------------------------------------------------------------------- dump / restore
def _static(graph: dict) -> bool:
    """Every placeholder is a tensor with integer sizes (the unlowered graphs are rebuilt from these)."""
    try:
        for n in graph["nodes"]:
            if n["op"] == "placeholder":
                [int(s) for s in n["meta"]["shape"] + n["meta"]["stride"]]
    except (TypeError, ValueError, KeyError):
        return False
    return True


def dump(compiled: CompiledGraph) -> tuple[dict, list[str]] | None:
    """The lowered program as JSON-able data plus its kernel sources, or None if it cannot be stored."""
    gm, log = compiled.gm, compiled.log
    sources: list[str] = []
    index: dict[str, int] = {}
    kernels = []
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        mod = gm.get_submodule(n.target)
        if not isinstance(mod, runtime.FusedKernel) or not mod.so_path:
            return None  # e.g. Triton kernels: not stored, rebuilt the usual way
        if mod.source_path not in index:
            index[mod.source_path] = len(sources)
            sources.append(Path(mod.source_path).read_text())
        kernels.append({"target": n.target, "name": mod.kernel_name, "source": index[mod.source_path],
                        "spec": _spec_to_dict(mod.spec), "members": mod.members, "kind": mod.kind,
                        "description": mod.description})
    try:
        program = graph_to_dict(compiled.program_gm)
        source = None if compiled.source_gm is compiled.program_gm else graph_to_dict(compiled.source_gm)
        data = {
            "format": FORMAT,
            "label": log.label,
            "num_nodes": log.num_nodes,
            "lowered": graph_to_dict(gm),
            "kernels": kernels,
            "kernel_infos": [dataclasses.asdict(k) for k in log.kernels],
            "fired": log.fired,
            "coverage": log.coverage,
            "rewrite_stats": cache.jsonable(log.rewrite_stats),
            "counts": _counts(log),
            "program": program,
            "source": source,
        }
    except TypeError:  # graph constants, symbolic scalars: not serialisable
        return None
    if not _static(program) or (source is not None and not _static(source)):
        return None
    json.dumps(data)  # raises here (TypeError/ValueError) rather than when written
    return data, sources


def restore(data: dict, sources: list[str], config: Config, *, how: str = "loaded") -> CompiledGraph:
    """Rebuild the compiled program: bind the kernels from their libraries (compiling a source only if
    this machine's kernel cache lacks it) and rebuild the lowered graph. The unlowered graphs are rebuilt
    only if something asks for them (a run-time fallback, a reproducer)."""
    if data.get("format") != FORMAT:
        raise ValueError(f"unsupported program artifact format {data.get('format')!r}")
    t0 = time.perf_counter()
    libs = []
    for src in sources:
        cpp, so = kernel_cache.build(src, config.cache_dir, config.cxx)
        libs.append((cpp, so, kernel_cache.load(so)))
    modules: dict[str, torch.nn.Module] = {}
    for k in data["kernels"]:
        cpp, so, lib = libs[k["source"]]
        spec = _spec_from_dict(k["spec"])
        fn = runtime.bind(lib, k["name"], len(spec.inputs) + len(spec.outputs))
        mod = runtime.FusedKernel(k["name"], fn, spec, k["members"], k["kind"], cpp, config.num_threads,
                                  k["description"])
        mod.so_path = so
        modules[k["target"]] = mod
    gm = graph_from_dict(data["lowered"], root=modules)  # no meta propagation: running needs none

    from fusion.lower import KernelInfo

    paths = {k["name"]: libs[k["source"]][0] for k in data["kernels"]}
    log = CompileLog(data["label"], num_nodes=data["num_nodes"])
    log.fired = data["fired"]
    log.coverage = data.get("coverage", [])   # artifacts stored before the coverage report have none
    for k, v in data.get("counts", {}).items():
        if hasattr(log, k):
            setattr(log, k, v)
    log.rewrite_stats = {**data["rewrite_stats"], "cache": how}
    log.kernels = [KernelInfo(**{**ki, "source_path": paths.get(ki["name"], ki["source_path"])})
                   for ki in data["kernel_infos"]]
    log.passes.append(PassRecord(how, time.perf_counter() - t0, True,
                                 "lowered program restored: no capture, rewrite or lowering ran"))
    program = _builder(data["program"])
    source = _builder(data["source"]) if data.get("source") is not None else None
    return CompiledGraph(gm, program, log, config, program, source)


def _builder(graph: dict) -> Any:
    def build() -> fx.GraphModule:
        return graph_from_dict(graph, fake_placeholders(graph))

    return build


def _counts(log: CompileLog) -> dict:
    """The log's plain numbers other than its label and size (e.g. how many GEMMs went to oneDNN)."""
    return {k: v for k, v in vars(log).items()
            if k not in ("label", "num_nodes") and isinstance(v, (int, float)) and not isinstance(v, bool)}


# ------------------------------------------------------------------------------------- output structure
#: packages whose modules may be imported to resolve an output type that is not registered yet (HF's
#: ModelOutput classes register themselves with pytree when their module is imported); any other type must
#: already be registered in the loading process
IMPORTABLE = ("transformers",)


def dump_spec(spec: Any) -> dict:
    """The output structure as pytree's JSON (types by their registered names, contexts as JSON): never a
    pickle, so loading it can only name types the loading process has registered."""
    try:
        return {"json": pytree.treespec_dumps(spec)}
    except Exception as e:  # noqa: BLE001
        raise TypeError(f"the model's output structure cannot be saved as JSON ({e}); return tensors, tuples, "
                        f"lists, dicts or a pytree-registered type (HF ModelOutput is)") from None


def load_spec(d: dict) -> Any:
    """The TreeSpec `dump_spec` wrote. A stored pickle is refused (ValueError), never unpickled."""
    if "json" not in d:
        raise ValueError("it is stored as a pickle, which fusion never loads; save the program again with this "
                         "version (output structures are JSON now)")
    try:
        return pytree.treespec_loads(d["json"])
    except Exception:  # noqa: BLE001 - e.g. a model output class whose module is not imported yet
        _import_output_types(d["json"])
        return pytree.treespec_loads(d["json"])


def _import_output_types(text: str) -> None:
    """Import the modules of the output types `text` names that belong to an IMPORTABLE package (installed
    code, imported by name; nothing from the file runs)."""
    import importlib
    import importlib.util
    import re

    for name in set(re.findall(r'"type": "([A-Za-z_][A-Za-z0-9_.]*)"', text)):
        mod = name.rpartition(".")[0]
        if mod.split(".")[0] in IMPORTABLE and importlib.util.find_spec(mod.split(".")[0]) is not None:
            try:
                importlib.import_module(mod)
            except ImportError:
                pass
