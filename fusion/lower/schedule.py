"""Greedy grouping of a fusion-dialect FX graph into "row kernels".

A row kernel has a domain shape D (rank >= 1, last dim N, rows = prod(D[:-1])). Each member node
has a *form* relative to D:

    "full"  its value has shape D
    "rowk"  row-constant, shape D[:-1] + [1]   (reduction with keepdim=True)
    "rown"  row-constant, shape D[:-1]         (reduction with keepdim=False)

Members: float32 pointwise ops whose output is full or row-constant, reductions (sum, mean, amax,
amin, var) over the last dim of a full value, views that only add/drop the trailing 1 of a
row-constant value (or change nothing), and the fused ops of `fusion.dialect.ops` over the last dim.
Nodes join a producer's group in topological order when their shape fits that group's D and the
merged group stays convex (no path group -> outside node -> group); everything else stays ATen.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from fusion.dialect.values import broadcastable, hint, same_dim, same_shape, tval

aten = torch.ops.aten

# --- op tables ---------------------------------------------------------------------------------
#: pointwise ops (any overload listed) -> primitive name used by codegen
POINTWISE: dict[Any, str] = {
    aten.add.Tensor: "add", aten.add.Scalar: "add", aten.sub.Tensor: "sub", aten.sub.Scalar: "sub",
    aten.rsub.Scalar: "rsub", aten.mul.Tensor: "mul", aten.mul.Scalar: "mul",
    aten.div.Tensor: "div", aten.div.Scalar: "div", aten.neg.default: "neg", aten.exp.default: "exp",
    aten.log.default: "log", aten.sqrt.default: "sqrt", aten.rsqrt.default: "rsqrt",
    aten.reciprocal.default: "recip", aten.tanh.default: "tanh", aten.erf.default: "erf",
    aten.sigmoid.default: "sigmoid", aten.relu.default: "relu", aten.abs.default: "abs",
    aten.pow.Tensor_Scalar: "pow", aten.maximum.default: "max", aten.minimum.default: "min",
    aten.clamp.default: "clamp", aten.clamp_min.default: "clamp_min", aten.clamp_max.default: "clamp_max",
    aten.where.self: "where", aten.masked_fill.Scalar: "masked_fill",
    aten.eq.Tensor: "eq", aten.eq.Scalar: "eq", aten.ne.Tensor: "ne", aten.ne.Scalar: "ne",
    aten.lt.Tensor: "lt", aten.lt.Scalar: "lt", aten.le.Tensor: "le", aten.le.Scalar: "le",
    aten.gt.Tensor: "gt", aten.gt.Scalar: "gt", aten.ge.Tensor: "ge", aten.ge.Scalar: "ge",
    aten.gelu.default: "gelu", aten.silu.default: "silu",
}
COMPARE = {"eq", "ne", "lt", "le", "gt", "ge"}
REDUCTIONS: dict[Any, str] = {
    aten.sum.dim_IntList: "sum", aten.mean.dim: "mean", aten.amax.default: "amax",
    aten.amin.default: "amin", aten.var.correction: "var",
}
ROW_FUSED: dict[Any, str] = {
    aten._softmax.default: "softmax", aten._log_softmax.default: "log_softmax",
}
_fusion_ns = getattr(torch.ops, "fusion", None)
if _fusion_ns is not None and hasattr(_fusion_ns, "layer_norm"):
    ROW_FUSED[torch.ops.fusion.layer_norm.default] = "layer_norm"
    ROW_FUSED[torch.ops.fusion.rms_norm.default] = "rms_norm"
ROW_FUSED[aten.native_layer_norm.default] = "layer_norm"   # only when just output 0 is used
if _fusion_ns is not None and hasattr(_fusion_ns, "gelu_quick"):
    POINTWISE[torch.ops.fusion.gelu_quick.default] = "gelu_quick"
    POINTWISE[torch.ops.fusion.swiglu.default] = "swiglu"      # act(g) * u: expanded into two prims
    POINTWISE[torch.ops.fusion.geglu.default] = "geglu"
VIEWS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.alias.default,
    aten.clone.default, aten._to_copy.default,
}
#: ops that do real arithmetic work (a group made only of views is not worth a kernel)
CHEAP = {"add", "sub", "rsub", "mul", "div", "neg", "relu", "abs", "max", "min", "clamp",
         "clamp_min", "clamp_max", "where", "masked_fill", "eq", "ne", "lt", "le", "gt", "ge", "recip"}

FLOAT_IN = (torch.float32,)
#: float dtypes a group may hold on the CUDA (Triton) path: kernels compute in fp32, store in the node's dtype
FLOAT_IN_CUDA = (torch.float32, torch.float16, torch.bfloat16)
MASK_IN = (torch.bool, torch.uint8)


#: a `devices` entry admitting bf16 buffers into CPU kernels (loads widen to fp32, stores round: codegen/prims.py);
#: `lower` passes it only in the approximate "bf16" mode
CPU_BF16 = "cpu+bf16"


def float_in(devices: tuple = ("cpu",)) -> tuple:
    """Float dtypes fusable for these device types (fp16/bf16 when CUDA is among them; bf16 with CPU_BF16)."""
    if "cuda" in devices:
        return FLOAT_IN_CUDA
    return FLOAT_IN + (torch.bfloat16,) if CPU_BF16 in devices else FLOAT_IN


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """cat([-x[..., N/2:], x[..., :N/2]], -1) (RoPE): `fusion.lower` puts it in for the ATen pattern, and
    kernels read it as an index-shifted load of x (x must then come from outside the kernel)."""
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


# --- groups ------------------------------------------------------------------------------------
@dataclass
class Group:
    D: list                                   # domain shape (ints or SymInts)
    members: list[fx.Node] = field(default_factory=list)
    form: dict[fx.Node, str] = field(default_factory=dict)
    id: int = 0

    @property
    def member_set(self) -> set:
        return set(self.form)

    def shape_of(self, form: str) -> list:
        return {"full": list(self.D), "rowk": list(self.D[:-1]) + [1], "rown": list(self.D[:-1])}[form]


def _tensor_args(n: fx.Node) -> list[fx.Node]:
    out = []
    for a in list(n.args) + list(n.kwargs.values()):
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, fx.Node))
    return [a for a in out if not _is_symint_node(a)]


def _scalar_ok(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device, torch.layout,
                                       torch.memory_format))


def _is_symint_node(x: Any) -> bool:
    return isinstance(x, fx.Node) and isinstance(x.meta.get("val"), (int, torch.SymInt))


def _size(x: Any) -> Any:
    return x.meta["val"] if isinstance(x, fx.Node) else x


def classify(n: fx.Node, devices: tuple = ("cpu",)) -> str | None:
    """'pw', 'red', 'fused', 'view' for fusable nodes (dtype-checked), None otherwise."""
    if n.op != "call_function":
        return None
    t = n.target
    if n.target is operator.getitem:
        src = n.args[0]
        if isinstance(src, fx.Node) and src.target is aten.native_layer_norm.default and n.args[1] == 0:
            return "view"
        return None
    v = tval(n)
    if v is None or v.device.type not in devices or v.layout != torch.strided:
        return None
    for a in list(n.args) + list(n.kwargs.values()):
        if isinstance(a, (list, tuple)):
            if not all(isinstance(x, (int, torch.SymInt)) or _is_symint_node(x) for x in a):
                return None
        elif not isinstance(a, fx.Node) and not _scalar_ok(a):
            return None
    FLOAT_IN = float_in(devices)  # noqa: N806 (shadows the CPU default inside this function)
    targs = _tensor_args(n)
    for a in targs:
        av = tval(a)
        if av is None or av.device.type not in devices or av.dtype not in FLOAT_IN + MASK_IN:
            return None
    if t is rotate_half:
        return "pw" if v.dtype in FLOAT_IN and tval(n.args[0]).dtype == v.dtype else None
    if t in POINTWISE:
        p = POINTWISE[t]
        if p == "add" or p == "sub":
            if n.kwargs.get("alpha", 1) != 1:
                return None
        if p == "div" and n.kwargs.get("rounding_mode") is not None:
            return None
        if p in COMPARE:
            return "pw" if v.dtype == torch.bool and all(tval(a).dtype in FLOAT_IN for a in targs) else None
        if v.dtype not in FLOAT_IN:
            return None
        if p == "where":
            c = n.args[0]
            if not isinstance(c, fx.Node) or tval(c).dtype not in MASK_IN:
                return None
            if any(isinstance(a, fx.Node) and tval(a).dtype not in FLOAT_IN for a in n.args[1:]):
                return None
        elif p == "masked_fill":
            if tval(n.args[0]).dtype not in FLOAT_IN or tval(n.args[1]).dtype not in MASK_IN:
                return None
        elif any(tval(a).dtype not in FLOAT_IN for a in targs):
            return None
        return "pw"
    if v.dtype not in FLOAT_IN or any(tval(a).dtype not in FLOAT_IN for a in targs):
        return None
    if t in REDUCTIONS:
        if n.kwargs.get("dtype") not in (None, v.dtype):
            return None
        return "red"
    if t in ROW_FUSED:
        if t is aten.native_layer_norm.default:
            if any(u.target is not operator.getitem or u.args[1] != 0 for u in n.users):
                return None
        return "fused"
    if t in VIEWS:
        if t is aten._to_copy.default:
            kw = dict(n.kwargs)
            kw.pop("dtype", None), kw.pop("device", None), kw.pop("layout", None)
            kw.pop("memory_format", None)
            if kw or v.dtype not in FLOAT_IN:
                return None
        return "view"
    return None


def _last_dim(n: fx.Node, rank: int, dims: Any) -> bool:
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(dims, (list, tuple)) or len(dims) != 1:
        return False
    return dims[0] in (-1, rank - 1)


def _form_of(shape, D) -> str | None:
    if same_shape(shape, D):
        return "full"
    if len(D) >= 1 and same_shape(shape, list(D[:-1]) + [1]):
        return "rowk"
    if len(D) >= 1 and same_shape(shape, list(D[:-1])):
        return "rown"
    return None


def fit(n: fx.Node, kind: str, g: Group) -> str | None:
    """The form n would have in g, or None when n does not fit g's domain."""
    D = g.D
    shape = list(tval(n).shape)
    out = _form_of(shape, D)
    if out is None:
        return None

    def operand_ok(a: fx.Node, target_form: str) -> bool:
        if a in g.form:
            f = g.form[a]
            if target_form == "full":
                return f in ("full", "rowk")
            return f == target_form
        return broadcastable(list(tval(a).shape), g.shape_of(target_form))

    if n.target is rotate_half:               # an index-shifted load: its operand is read from memory
        x = n.args[0]
        return out if out == "full" and x not in g.form and same_shape(list(tval(x).shape), D) else None
    if kind == "pw":
        return out if all(operand_ok(a, out) for a in _tensor_args(n)) else None
    if kind == "red":
        x = n.args[0]
        if n.target is aten.var.correction:
            dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            keep = n.kwargs.get("keepdim", False)
        else:
            dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        if not _last_dim(n, len(D), dims):
            return None
        if not same_shape(list(tval(x).shape), D):
            return None
        if x in g.form and g.form[x] != "full":
            return None
        want = "rowk" if keep else "rown"
        return out if out == want else None
    if kind == "fused":
        x = n.args[0]
        if n.target in (aten._softmax.default, aten._log_softmax.default):
            if n.args[1] not in (-1, len(D) - 1) or n.args[2]:
                return None
        if n.target is aten.native_layer_norm.default:
            ns = n.args[1]
            if len(ns) != 1 or not same_dim(_size(ns[0]), D[-1]):
                return None
        if out != "full" or not same_shape(list(tval(x).shape), D):
            return None
        if x in g.form and g.form[x] != "full":
            return None
        return out if all(operand_ok(a, "full") for a in _tensor_args(n)[1:]) else None
    if kind == "view":
        x = n.args[0]
        if x not in g.form:
            return None
        f = g.form[x]
        if n.target is operator.getitem:
            return f
        if f == "full":
            return "full" if out == "full" and same_shape(list(tval(x).shape), shape) else None
        return out if out in ("rowk", "rown") else None
    return None


def seed(n: fx.Node, kind: str, devices: tuple = ("cpu",)) -> Group | None:
    v = tval(n)
    if kind in ("pw", "fused"):
        D = list(v.shape)
    elif kind == "red":
        D = list(tval(n.args[0]).shape)
    else:
        return None
    if len(D) < 1 or v.dtype not in float_in(devices):
        return None
    g = Group(D=D)
    f = fit(n, kind, g)
    if f != "full" and not (kind == "red" and f in ("rowk", "rown")):
        return None
    g.members.append(n)
    g.form[n] = f
    return g


def _creates_cycle(S: set, index: dict) -> bool:
    """True if some node outside S lies on a path from S to S."""
    hi = max(index[x] for x in S)
    down: set = set()          # outside nodes reachable from S (within the index window)
    stack = [u for x in S for u in x.users if u not in S and index.get(u, hi + 1) < hi]
    while stack:
        u = stack.pop()
        if u in down:
            continue
        down.add(u)
        for w in u.users:
            if w in S:
                return True
            if w not in down and index.get(w, hi + 1) < hi:
                stack.append(w)
    return False


def _rot_conflict(a: Group, b: Group) -> bool:
    """A rotate_half member must keep reading its operand from memory: no merge that would pull it in."""
    return any(m.target is rotate_half and (m.args[0] in b.form if m in a.form else m.args[0] in a.form)
               for m in a.members + b.members)


def schedule(gm: fx.GraphModule, devices: tuple = ("cpu",)) -> list[Group]:
    """Greedy grouping in topological order; returns groups with >= 1 member (not yet filtered).

    `devices`: device types whose nodes may be fused (the Triton path passes ("cuda",))."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    owner: dict[fx.Node, Group] = {}
    groups: list[Group] = []
    for n in nodes:
        kind = classify(n, devices)
        if kind is None:
            continue
        prods = []
        for a in _tensor_args(n):
            g = owner.get(a)
            if g is not None and g not in prods:
                prods.append(g)
        joined = None
        for g in prods:
            f = fit(n, kind, g)
            if f is None or _creates_cycle(g.member_set | {n}, index):
                continue
            g.members.append(n)
            g.form[n] = f
            owner[n] = g
            joined = g
            break
        if joined is not None:
            for h in prods:
                if h is joined or not same_shape(h.D, joined.D):
                    continue
                if _creates_cycle(joined.member_set | h.member_set, index) or _rot_conflict(joined, h):
                    continue
                for m in h.members:
                    joined.form[m] = h.form[m]
                    owner[m] = joined
                joined.members = sorted(joined.members + h.members, key=index.__getitem__)
                groups.remove(h)
            continue
        g = seed(n, kind, devices)
        if g is not None:
            groups.append(g)
            owner[n] = g
    for i, g in enumerate(groups):
        g.id = i
    return groups


def group_outputs(g: Group) -> list[fx.Node]:
    ms = g.member_set
    return [m for m in g.members if any(u not in ms for u in m.users)]


def worth_a_kernel(g: Group, hw: Any = None, min_numel: int = 16384) -> bool:
    """Skip groups without arithmetic, and single cheap ops where ATen is as good: by the roofline
    model when a HardwareProfile is given (ATen pays its call overhead and first-touch page faults
    on a fresh output; a kernel writes into a pooled buffer), else below `min_numel` elements."""
    prims = [POINTWISE[m.target] for m in g.members if m.target in POINTWISE]
    real = [m for m in g.members if m.target in POINTWISE or m.target in REDUCTIONS or m.target in ROW_FUSED]
    if not real:
        return False
    if len(real) == 1 and prims and prims[0] in CHEAP:
        numel = 1
        for d in g.D:
            numel *= hint(d)
        if hw is not None:
            from fusion.costmodel.roofline import Cost
            n_in = len([a for a in _tensor_args(real[0])])
            c = Cost(bytes_read=4.0 * numel * n_in, bytes_written=4.0 * numel, flops=float(numel), calls=1)
            aten = c.time(hw, hw.aten_overhead)
            if hw.page_fault_bandwidth and numel * 4 >= (32 << 20):
                aten += 4.0 * numel / hw.page_fault_bandwidth
            return c.time(hw, hw.kernel_overhead) < aten
        return numel >= min_numel
    return True
