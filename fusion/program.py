"""Saved programs: `OptimizedModule.save(dir)` and `fusion.load(dir)`.

A saved program is a directory:
    program.json         the rewritten graph (structure, shapes, dtypes — no weight data), how each
                         placeholder is bound (weight name or user input), the output structure, the config
    program.py           the same program as readable Python (for people; not executed)
    weights.safetensors  parameters, buffers and constants by name, written tensor by tensor
Loading memory-maps the weights (nothing is read until used) and recompiles the graph, which hits the
kernel cache when the same kernels were compiled on this machine before.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from fusion.config import Config
from fusion.errors import FusionInputError
from fusion.serialize import graph_from_dict, graph_to_dict
from fusion.weights import load_safetensors_mmap, save_safetensors

FORMAT = "fusion-program/1"


def save_program(opt: Any, path: str | Path) -> Path:
    if opt._captured is None or not opt.graphs:
        raise FusionInputError(
            "only programs captured whole by torch.export can be saved; this model was captured by "
            f"{opt.capture_method!r}{opt.capture_note}. Make the model exportable (e.g. return plain tensors) to save it."
        )
    cap = opt._captured
    graph = opt.graphs[0]
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    weights = {}
    for (kind, name), acc in zip(cap.input_bindings, opt._accessors):
        if acc is not None:
            weights[name] = acc()
    save_safetensors(weights, out / "weights.safetensors")
    out_spec = _dump_spec(cap.program.call_spec.out_spec)
    cfg = {k: (sorted(v) if isinstance(v, frozenset) else v) for k, v in opt.config.__dict__.items()}
    program = {
        "format": FORMAT,
        "model": type(opt.original).__name__,
        "graph": graph_to_dict(graph.program_gm),
        "bindings": cap.input_bindings,
        "buffer_mutations": {str(k): v for k, v in cap.buffer_mutations.items()},
        "out_spec": out_spec,
        "config": cfg,
        "fired": graph.log.fired,
    }
    (out / "program.json").write_text(json.dumps(program, indent=1))
    (out / "program.py").write_text(f"# {type(opt.original).__name__}, optimized by fusion (rewritten graph)\n"
                                    + graph.program_gm.code)
    return out


def _dump_spec(spec: Any) -> dict:
    """The output structure: pytree's JSON where its types are registered for it, else a pickle of the
    TreeSpec (model output classes such as HF's ModelOutput: the class must be importable at load)."""
    import base64
    import pickle

    out: dict = {}
    try:
        out["json"] = pytree.treespec_dumps(spec)  # readable; needs the types registered at load time
    except Exception:  # noqa: BLE001
        pass
    try:
        out["pickle"] = base64.b64encode(pickle.dumps(spec)).decode()  # imports the output classes itself
    except Exception as e:  # noqa: BLE001
        if not out:
            raise FusionInputError(f"the model's output structure cannot be saved ({e}); return tensors or tuples") from None
    return out


def _load_spec(d: dict) -> Any:
    import base64
    import pickle

    if "json" in d:
        try:
            return pytree.treespec_loads(d["json"])
        except Exception:  # noqa: BLE001 - e.g. a model output class not registered in this process
            if "pickle" not in d:
                raise
    return pickle.loads(base64.b64decode(d["pickle"]))  # written by save_program, a file the user chose to load


class LoadedProgram(torch.nn.Module):
    """A saved program, callable with the model's user inputs; weights stay memory-mapped."""

    def __init__(self, path: str | Path, config: Config | None = None):
        super().__init__()
        from torch._subclasses.fake_tensor import FakeTensorMode

        from fusion.pipeline import compile_graph

        path = Path(path)
        data = json.loads((path / "program.json").read_text())
        if data.get("format") != FORMAT:
            raise FusionInputError(f"{path} is not a fusion program directory (format {data.get('format')!r})")
        self.weights = load_safetensors_mmap(path / "weights.safetensors")
        self.bindings = [tuple(b) for b in data["bindings"]]
        self.buffer_mutations = {int(k): v for k, v in data["buffer_mutations"].items()}
        self.out_spec = _load_spec(data["out_spec"])
        saved = data["config"]
        saved["rewrites"] = False  # the saved graph is already rewritten
        self.config = config or Config(**{k: (frozenset(v) if isinstance(v, list) else v) for k, v in saved.items()})
        mode = FakeTensorMode()
        vals = []
        nodes = data["graph"]["nodes"]
        for node in nodes:
            if node["op"] != "placeholder":
                continue
            m = node["meta"]
            with mode:
                vals.append(torch.empty_strided([int(s) for s in m["shape"]], [int(s) for s in m["stride"]],
                                                dtype=getattr(torch, m["dtype"])))
        gm = graph_from_dict(data["graph"], vals)
        self.compiled = compile_graph(gm, self.config, label="forward")

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
        return self.compiled.code


def load(path: str | Path, config: Config | None = None) -> LoadedProgram:
    """Load a program saved with `OptimizedModule.save(path)`; weights are memory-mapped, not read."""
    return LoadedProgram(path, config)
