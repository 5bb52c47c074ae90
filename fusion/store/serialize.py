"""Graphs as plain JSON-able data: for the compile cache, saved programs and weight-free reproducers.

Only structure goes in: ops, argument structure, shapes, dtypes, strides. Never tensor data — weights
are placeholders, referenced by name (seed 000).

Reading is strict, since a graph read from disk is called: a node may only be a placeholder, the output, a
call of a submodule the reader supplies (a kernel it bound itself), or a call of an op on the allowlist —
the tensor-op namespaces below (less the few ops that touch files or print) and a short list of named
Python functions. Anything else (an arbitrary `py:` callable, `call_method`, `get_attr`, a dtype that is
not one) raises `UnsafeGraphError` and nothing of the graph runs. Writing refuses the same targets, so no
cache entry is made that could not be read.
"""
from __future__ import annotations

import hashlib
import json
import operator
from typing import Any

import torch
import torch.fx as fx

FORMAT_VERSION = 1

#: op namespaces a stored graph may call (tensor computation only)
SAFE_NAMESPACES = frozenset({"aten", "prims", "fusion", "mkldnn", "mkl", "onednn", "quantized", "_quantized"})
#: ops of those namespaces that reach outside the tensors (files, the console)
UNSAFE_OPS = frozenset({"aten::from_file", "aten::save", "aten::_print", "aten::warn"})
#: the Python callables a stored graph may call, by the name `_target_name` writes
SAFE_CALLABLES = frozenset(
    {f"py:_operator.{f}" for f in ("add", "sub", "mul", "truediv", "floordiv", "mod", "neg", "pow", "eq", "ne",
                                   "lt", "le", "gt", "ge")}
    | {f"py:math.{f}" for f in ("ceil", "floor", "sqrt", "exp", "log", "trunc")}
    # the pure tensor functions the passes put in graphs (tests/test_hostile.py checks each resolves)
    | {"py:fusion.dialect.stacked.stacked_linear_impl", "py:fusion.passes.attention.decomposed_attention",
       "py:fusion.lower.schedule.rotate_half"}
)
NODE_OPS = frozenset({"placeholder", "output", "call_function", "call_module"})


class UnsafeGraphError(ValueError):
    """A stored graph names something a graph read from disk may not call."""


def _target_name(target: Any) -> str:
    if target is operator.getitem:
        return "operator.getitem"
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}::{target._schema.name.split('::')[-1]}.{target._overloadname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        raise TypeError(f"unresolved op packet {target}")
    if isinstance(target, str):
        return target
    mod = getattr(target, "__module__", "")
    name = f"py:{mod}.{getattr(target, '__qualname__', getattr(target, '__name__', repr(target)))}"
    if name not in SAFE_CALLABLES:
        raise TypeError(f"{name[3:]} is not on the list of callables a stored graph may call")
    return name


def _resolve_target(name: str, op: str = "call_function") -> Any:
    if op == "call_module":
        return name                              # looked up in the reader's own modules only
    if name == "operator.getitem":
        return operator.getitem
    if name.startswith("py:"):
        if name not in SAFE_CALLABLES:
            raise UnsafeGraphError(f"the graph calls {name[3:]!r}, which a stored graph may not call")
        import importlib

        mod, _, attr = name[3:].rpartition(".")
        return getattr(importlib.import_module(mod), attr)
    ns, sep, rest = name.partition("::")
    if not sep or ns not in SAFE_NAMESPACES or name.split(".")[0] in UNSAFE_OPS:
        raise UnsafeGraphError(f"the graph calls {name!r}, which a stored graph may not call")
    op_name, _, overload = rest.partition(".")
    try:
        return getattr(getattr(getattr(torch.ops, ns), op_name), overload or "default")
    except (AttributeError, RuntimeError):
        raise UnsafeGraphError(f"the graph calls {name!r}, which this torch does not have") from None


def _torch_attr(name: Any, kind: type) -> Any:
    """torch.<name> when it is a `kind` (a dtype, a memory format, a layout), else UnsafeGraphError."""
    v = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(v, kind):
        raise UnsafeGraphError(f"{name!r} is not a torch {kind.__name__}")
    return v


def _enc(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return {"n": a.name}
    if isinstance(a, (list, tuple)):
        return {"l" if isinstance(a, list) else "t": [_enc(x) for x in a]}
    if isinstance(a, dict):
        return {"d": {k: _enc(v) for k, v in a.items()}}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).removeprefix("torch.")}
    if isinstance(a, torch.layout):
        return {"layout": str(a).removeprefix("torch.")}
    if isinstance(a, float) and a != a:
        return {"f": "nan"}
    if isinstance(a, float) and a in (float("inf"), float("-inf")):
        return {"f": "inf" if a > 0 else "-inf"}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    if isinstance(a, torch.SymInt | torch.SymFloat):
        raise TypeError("symbolic scalar constants in node arguments are not serialisable")
    raise TypeError(f"cannot serialise argument of type {type(a).__name__}")


def _dec(a: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(a, dict):
        (k, v), = a.items()
        if k == "n":
            return env[v]
        if k == "l":
            return [_dec(x, env) for x in v]
        if k == "t":
            return tuple(_dec(x, env) for x in v)
        if k == "d":
            return {kk: _dec(vv, env) for kk, vv in v.items()}
        if k == "dtype":
            return _torch_attr(v, torch.dtype)
        if k == "device":
            return torch.device(v)
        if k == "memory_format":
            return _torch_attr(v, torch.memory_format)
        if k == "layout":
            return _torch_attr(v, torch.layout)
        if k == "f":
            return float(v)
    return a


def _meta(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        return {"shape": [str(s) for s in val.shape], "dtype": str(val.dtype).removeprefix("torch."),
                "stride": [str(s) for s in val.stride()]}
    if isinstance(val, (list, tuple)):
        return [_meta(v) for v in val]
    if val is None:
        return None
    return {"scalar": str(val)}


def graph_to_dict(gm: fx.GraphModule) -> dict:
    """The graph as JSON-able data: one entry per node with op, target, args and the example meta."""
    nodes = []
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            raise TypeError(f"get_attr node {n.name} (graph constants) is not serialisable")
        nodes.append({
            "name": n.name,
            "op": n.op,
            "target": _target_name(n.target),
            "args": _enc(n.args),
            "kwargs": _enc(n.kwargs),
            "meta": None if n.op == "output" else _meta(n.meta.get("val")),
        })
    return {"format": FORMAT_VERSION, "nodes": nodes}


def graph_from_dict(data: dict, placeholder_vals: list[Any] | None = None,
                    root: dict[str, torch.nn.Module] | None = None) -> fx.GraphModule:
    """Rebuild a GraphModule; with the placeholders' example values (FakeTensors), meta["val"] is recomputed.

    `root` holds the submodules that call_module nodes name (the kernels of a lowered program)."""
    if data.get("format") != FORMAT_VERSION:
        raise ValueError(f"unsupported graph format {data.get('format')!r}")
    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    for d in data["nodes"]:
        if d["op"] not in NODE_OPS or (d["op"] == "call_module" and d["target"] not in (root or {})):
            raise UnsafeGraphError(f"node {d.get('name')!r}: a stored graph may not hold a {d['op']} of {d.get('target')!r}")
        args, kwargs = _dec(d["args"], env), _dec(d["kwargs"], env)
        if d["op"] == "placeholder":
            node = g.placeholder(d["name"])
        elif d["op"] == "output":
            node = g.output(args[0])
        else:
            node = g.create_node(d["op"], _resolve_target(d["target"], d["op"]), args, kwargs, name=d["name"])
        env[d["name"]] = node
    gm = fx.GraphModule(root if root else torch.nn.Module(), g)
    if placeholder_vals is not None:
        propagate_meta(gm, placeholder_vals)
    return gm


def fake_placeholders(data: dict) -> list[Any]:
    """FakeTensors for the placeholders of a serialised graph, from their recorded shape, stride and dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    vals = []
    for node in data["nodes"]:
        if node["op"] != "placeholder":
            continue
        m = node["meta"]
        with mode:
            vals.append(torch.empty_strided([int(s) for s in m["shape"]], [int(s) for s in m["stride"]],
                                            dtype=_torch_attr(m["dtype"], torch.dtype)))
    return vals


def propagate_meta(gm: fx.GraphModule, placeholder_vals: list[Any]) -> None:
    """Set meta["val"] on every node by running the graph on the placeholders' FakeTensors."""
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = detect_fake_mode(placeholder_vals)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n, v in zip(placeholders, placeholder_vals):
        n.meta["val"] = v
    if mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*placeholder_vals)


def graph_key(gm: fx.GraphModule, *extra: str) -> str:
    """A content hash of the graph's structure, shapes, dtypes and strides (never tensor data) plus `extra`."""
    h = hashlib.sha256()
    h.update(json.dumps(graph_to_dict(gm), sort_keys=True).encode())
    for e in extra:
        h.update(b"\0" + e.encode())
    return h.hexdigest()
