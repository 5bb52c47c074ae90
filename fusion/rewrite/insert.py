"""FX (ATen or fusion dialect) -> e-graph terms.

Which FX nodes are modelled: float-dtype `call_function`s from `_OPS` below whose tensor
inputs all have the output's dtype, and casts between float dtypes (`cast(x, "bfloat16")`). Everything else -- placeholders, views, casts, integer
arithmetic, multi-dim reductions -- is a leaf `Tensor.var(node.name)`; its data never enters.

Each modelled node is bound with `egraph.let(node.name, term)` so its e-class can be found again
after saturation, and gets `shape`/`dtype` facts from `meta["val"]`. A node is a *root* (must be
materialised by extraction) when a non-modelled node or the output uses it.

Operand order of commutative ops (add, mul) is canonical: scalars last, then leaves before
computed operands, then the earlier-defined operand first. `x * sigmoid(x)` and
`w * norm(x)` are therefore inserted in one orientation whatever order the source used.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from egglog import EGraph
from torch.fx import Node

import fusion.dialect.ops  # noqa: F401  (registers torch.ops.fusion.*)
from fusion.dialect import values
from fusion.dialect.graph_walk import layout_may_differ
from fusion.rewrite.egraph import REDUCE_OPS, UNARY_OPS, declare

aten = torch.ops.aten
#: users that only check a value's metadata: they do not make a value a root (rebuild drops such a
#: check when the value it checks is no longer computed; export verified the metadata already)
CHECK_ONLY = {aten._assert_tensor_metadata.default}
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Scalar:
    """A Python-number operand (becomes `Tensor.scalar(value)`)."""
    value: float


@dataclass(frozen=True)
class Shape:
    """A literal list of ints (a view's output shape, permute dims): `(vec-of ...)` in the e-graph."""
    dims: tuple


ABSENT = "__absent__"   # an absent optional tensor (becomes `Tensor.none()`)


@dataclass
class Signature:
    """How one FX node is modelled: an e-graph op name and its arguments, in e-graph order.

    Tensor arguments are FX `Node`s, `Scalar`s or `ABSENT`; the rest are literals (str, float, int, bool).
    """
    op: str
    args: tuple


@dataclass
class Inserted:
    egraph: EGraph
    signatures: dict[Node, Signature]            # modelled FX nodes
    leaves: dict[str, Node]                      # leaf name -> FX node
    roots: list[Node]                            # modelled nodes that must be materialised
    symbols: dict[str, int] = field(default_factory=dict)   # symbolic size without a values.size_id -> its id
    sizes: dict[int, Node] = field(default_factory=dict)     # symbolic size id -> FX node computing it


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, Node) else None


def _is_float_tensor(n: Any) -> bool:
    v = _val(n)
    return isinstance(v, torch.Tensor) and v.dtype in FLOATS


def _is_bool_tensor(n: Any) -> bool:
    v = _val(n)
    return isinstance(v, torch.Tensor) and v.dtype == torch.bool


def _fill_kind(n: Node) -> str | None:
    """"neg_big" for a 0-d constant fill <= finfo(dtype).min (-inf included): what masks are filled with."""
    v = _val(n)
    if not (isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype in FLOATS):
        return None
    if n.target is aten.scalar_tensor.default:
        value = n.args[0]
    elif n.target is aten.full.default and list(n.args[0]) == []:
        value = n.args[1]
    else:
        return None
    return "neg_big" if isinstance(value, (int, float)) and value <= torch.finfo(v.dtype).min else None


def _scalar(a: Any) -> Scalar | None:
    if isinstance(a, bool) or not isinstance(a, (int, float)):
        return None
    f = float(a)
    if not math.isfinite(f) or (f == 0.0 and math.copysign(1.0, f) < 0) or (isinstance(a, int) and abs(a) > 2**53):
        return None
    return Scalar(f)


def _dim(node: Node, d: Any) -> int | None:
    """A single reduction dim, normalised to be >= 0 (None if it is not one int)."""
    if isinstance(d, (list, tuple)):
        if len(d) != 1:
            return None
        d = d[0]
    if not isinstance(d, int) or isinstance(d, bool):
        return None
    rank = _val(node.args[0]).dim()
    d = d + rank if d < 0 else d
    return d if 0 <= d < rank else None  # 0-dim tensors (torch allows dim 0/-1 there) stay leaves


def _tensor_or_scalar(a: Any) -> Any:
    if isinstance(a, Node):
        return a if _is_float_tensor(a) else None
    return _scalar(a)


def _binary(op: str) -> Callable[[Node], Signature | None]:
    def sig(n: Node) -> Signature | None:
        if n.kwargs.get("alpha", 1) != 1 or n.kwargs.get("rounding_mode") is not None or len(n.args) != 2:
            return None
        a, b = (_tensor_or_scalar(x) for x in n.args)
        if a is None or b is None or not isinstance(a, Node):
            return None
        return Signature(op, (a, b))
    return sig


def _unary(op: str) -> Callable[[Node], Signature | None]:
    return lambda n: Signature("unary", (op, n.args[0])) if len(n.args) == 1 and not n.kwargs else None


def _reduce(op: str) -> Callable[[Node], Signature | None]:
    def sig(n: Node) -> Signature | None:
        if n.kwargs.get("dtype") is not None or len(n.args) < 2:
            return None
        d = _dim(n, n.args[1])
        keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        return None if d is None else Signature("reduce", (op, n.args[0], d, bool(keep)))
    return sig


def _variance(n: Node, x: Node) -> Signature | None:
    d = _dim(n, n.args[1] if len(n.args) > 1 else n.kwargs.get("dim"))
    corr = n.kwargs.get("correction", 1)
    corr = 1.0 if corr is None else float(corr)
    return None if d is None else Signature("var_", (x, d, corr, bool(n.kwargs.get("keepdim", False))))


def _getitem(n: Node) -> Signature | None:
    src, i = n.args
    if not isinstance(src, Node) or src.target is not aten.var_mean.correction or not _is_float_tensor(src.args[0]):
        return None
    if i == 0:
        return _variance(src, src.args[0])
    d = _dim(src, src.args[1] if len(src.args) > 1 else src.kwargs.get("dim"))
    return None if d is None else Signature("reduce", ("mean", src.args[0], d, bool(src.kwargs.get("keepdim", False))))


def _pow(n: Node) -> Signature | None:
    e = _scalar(n.args[1])
    return None if e is None else Signature("pow_", (n.args[0], e.value))


def _dim_op(op: str) -> Callable[[Node], Signature | None]:
    def sig(n: Node) -> Signature | None:
        d = _dim(n, n.args[1])
        return None if d is None or n.args[2] else Signature(op, (n.args[0], d))
    return sig


def _gelu(n: Node) -> Signature | None:
    return Signature("gelu", (n.args[0], n.kwargs.get("approximate", n.args[1] if len(n.args) > 1 else "none")))


def _opt(a: Any) -> Any:
    return ABSENT if a is None else a


def _addmm(n: Node) -> Signature | None:
    if n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1:
        return None
    return Signature("addmm", tuple(n.args[:3]))


def _cast(n: Node) -> Signature | None:
    """`_to_copy(x, dtype=D)` / `convert_element_type(x, D)` between float dtypes (no device/layout/format change)."""
    if n.target is aten._to_copy.default:
        if set(n.kwargs) - {"dtype"} or len(n.args) != 1:
            return None
        dt = n.kwargs.get("dtype")
    else:
        dt = n.args[1] if len(n.args) > 1 else None
    if dt not in FLOATS or not _is_float_tensor(n.args[0]):
        return None
    return Signature("cast", (n.args[0], str(dt).removeprefix("torch.")))


def _out_shape(n: Node) -> Shape | None:
    """The output shape as e-graph sizes (symbolic ones as `values.size_id`); None if one has no id."""
    dims = tuple(values.size_id(d) for d in _val(n).shape)
    return None if any(d is None for d in dims) else Shape(dims)


def _reshape(n: Node) -> Signature | None:
    s = _out_shape(n)
    return None if s is None else Signature("view", (n.args[0], s))


def _expand(n: Node) -> Signature | None:
    s = _out_shape(n)
    return None if s is None or n.kwargs.get("implicit") else Signature("expand", (n.args[0], s))


def _permute(n: Node) -> Signature | None:
    rank = _val(n).dim()
    return Signature("permute", (n.args[0], Shape(tuple(d % rank for d in n.args[1]))))


def _unsqueeze(n: Node) -> Signature | None:
    d = n.args[1]
    return Signature("unsqueeze", (n.args[0], d % _val(n).dim()))


_OPS: dict[Any, Callable[[Node], Signature | None]] = {
    aten.view.default: _reshape,
    aten._unsafe_view.default: _reshape,
    aten.reshape.default: _reshape,
    aten.expand.default: _expand,
    **{o: _reshape for o in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)},   # a view that drops 1s
    aten.permute.default: _permute,
    aten.unsqueeze.default: _unsqueeze,
    aten.clone.default: lambda n: Signature("clone", (n.args[0],)),
    aten._to_copy.default: _cast,
    torch.ops.prims.convert_element_type.default: _cast,
    aten.where.self: lambda n: Signature("where", tuple(n.args)) if _is_bool_tensor(n.args[0]) else None,
    **{getattr(aten, f"{o}").Tensor: _binary(o) for o in ("add", "sub", "mul", "div")},
    **{getattr(aten, f"{o}").Scalar: _binary(o) for o in ("add", "sub", "mul", "div")},
    **{getattr(aten, o).default: _unary(o) for o in UNARY_OPS},
    aten.sum.dim_IntList: _reduce("sum"),
    aten.mean.dim: _reduce("mean"),
    aten.amax.default: _reduce("amax"),
    aten.amin.default: _reduce("amin"),
    aten.var.correction: lambda n: _variance(n, n.args[0]),
    operator.getitem: _getitem,
    aten.pow.Tensor_Scalar: _pow,
    aten.mm.default: lambda n: Signature("mm", tuple(n.args)),
    aten.bmm.default: lambda n: Signature("bmm", tuple(n.args)),
    aten.addmm.default: _addmm,
    aten._softmax.default: _dim_op("softmax"),
    aten._log_softmax.default: _dim_op("log_softmax"),
    aten.gelu.default: _gelu,
    aten.silu.default: lambda n: Signature("silu", (n.args[0],)),
    torch.ops.fusion.gelu_quick.default: lambda n: Signature("gelu", (n.args[0], "quick")),
    torch.ops.fusion.swiglu.default: lambda n: Signature("glu", (n.args[0], n.args[1], "silu")),
    torch.ops.fusion.geglu.default: lambda n: Signature("glu", (n.args[0], n.args[1], "gelu" if n.args[2] == "none" else "gelu_tanh")),
    torch.ops.fusion.layer_norm.default: lambda n: Signature("layer_norm", (n.args[0], _opt(n.args[1]), _opt(n.args[2]), float(n.args[3]))),
    torch.ops.fusion.rms_norm.default: lambda n: Signature("rms_norm", (n.args[0], _opt(n.args[1]), float(n.args[2]))),
}
assert set(REDUCE_OPS) >= {"sum", "mean", "amax"}


def signature(n: Node) -> Signature | None:
    """The e-graph form of `n`, or None if `n` is a leaf."""
    if n.op != "call_function" or n.target not in _OPS or not _is_float_tensor(n):
        return None
    try:
        sig = _OPS[n.target](n)
    except (IndexError, TypeError, AttributeError):
        return None
    if sig is None:
        return None
    out_dtype = _val(n).dtype
    if sig.op == "cast":                                         # the one op whose input has another dtype
        return sig
    for a in sig.args[1:] if sig.op == "where" else sig.args:   # where's condition is a bool leaf
        if isinstance(a, Node) and not (_is_float_tensor(a) and _val(a).dtype == out_dtype):
            return None
    return sig


def _canonical(sig: Signature, modelled: dict[Node, Signature], order: dict[Node, int]) -> Signature:
    """Scalars last, then leaves first, then earlier-defined first (commutative ops only)."""
    if sig.op not in ("add", "mul"):
        return sig
    def key(a: Any) -> tuple:
        if isinstance(a, Scalar):
            return (2, 0)
        return (0 if a not in modelled else 1, order[a])
    return Signature(sig.op, tuple(sorted(sig.args, key=key)))


def insert(gm: torch.fx.GraphModule) -> Inserted:
    """Build an e-graph holding every modelled node of `gm` (one `let` each).

    The terms are loaded as egglog program text, one command at a time: building them through the
    high-level Python API costs ~0.5 ms a term, and parsing one long program is superlinear
    (62 s for 1,656 lets as one text; 0.5 s for 6,400 commands parsed one by one).
    """
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    modelled: dict[Node, Signature] = {}
    for n in nodes:
        sig = signature(n)
        if sig is not None:
            modelled[n] = sig
    for n, sig in modelled.items():
        modelled[n] = _canonical(sig, modelled, order)

    eg = EGraph()
    declare(eg)
    ins = Inserted(eg, modelled, {}, [], sizes=_size_nodes(nodes))
    lines: list[str] = []

    def arg(a: Any) -> str:
        if isinstance(a, Node):
            if a in modelled:
                return f"${a.name}"
            if a.name not in ins.leaves:
                ins.leaves[a.name] = a
                lines.extend(_facts(f'(var "{a.name}")', a, ins.symbols))
                if _fill_kind(a):
                    lines.append(f'(set (fill_kind (var "{a.name}")) "{_fill_kind(a)}")')
            return f'(var "{a.name}")'
        if isinstance(a, Scalar):
            return f"(scalar {a.value!r})"
        if a is ABSENT:
            return "(none)"
        if isinstance(a, bool):
            return "true" if a else "false"
        if isinstance(a, float):
            return repr(a)
        if isinstance(a, int):
            return str(a)
        if isinstance(a, Shape):
            return f"(vec-of {' '.join(str(d) for d in a.dims)})" if a.dims else "(vec-empty)"
        if isinstance(a, str) and a.isidentifier():
            return f'"{a}"'
        raise ValueError(f"cannot write literal {a!r}")

    for n, sig in modelled.items():
        if not n.name.isidentifier():
            raise ValueError(f"FX node name {n.name!r} is not an identifier")
        lines.append(f"(let ${n.name} ({sig.op} {' '.join(arg(a) for a in sig.args)}))")
        lines.extend(_facts(f"${n.name}", n, ins.symbols))
        if any(u not in modelled and u.target not in CHECK_ONLY for u in n.users):
            ins.roots.append(n)
    raw = eg._egraph  # the program-text entry point of the bindings (private; used only here)
    for line in lines:  # one command per parse: parsing is superlinear in the text's length
        raw.run_program(*raw.parse_program(line))
    return ins


def size_id(s: Any, symbols: dict[str, int]) -> int:
    """An int size; a symbolic one as `values.size_id` (sizes that multiply as the symbols do), else an id
    of its own (compared, never computed)."""
    sid = values.size_id(s)
    if sid is not None:
        return sid
    return symbols.setdefault(str(s), -values.SYM_UNIT * (100_003 + len(symbols)))


def _size_nodes(nodes: list[Node]) -> dict[int, Node]:
    """Symbolic e-graph size -> an FX node computing it (a SymInt placeholder, sym_size, `s0 * s1`): what a
    view that rules created with that size is given when it is rebuilt."""
    out: dict[int, Node] = {}
    for n in nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.SymInt):
            sid = values.size_id(v)
            if sid is not None and values.is_symbolic_id(sid):
                out.setdefault(sid, n)
    return out


def _facts(term: str, n: Node, symbols: dict[str, int]) -> list[str]:
    v = _val(n)
    if not isinstance(v, torch.Tensor):
        return []
    dims = " ".join(str(size_id(s, symbols)) for s in v.shape)
    vec = f"(vec-of {dims})" if dims else "(vec-empty)"
    facts = [f"(set (shape {term}) {vec})", f'(set (dtype {term}) "{str(v.dtype).removeprefix("torch.")}")']
    if _contiguous(v) and not layout_may_differ(n):   # an attention output's strides vary by kernel
        facts.append(f"(set (contig {term}) true)")
    return facts


def _contiguous(v: torch.Tensor) -> bool:
    """Row-major contiguous, decided without guarding on symbolic sizes (unknown: False)."""
    return all(isinstance(s, int) for s in v.shape) and all(isinstance(s, int) for s in v.stride()) and v.is_contiguous()
