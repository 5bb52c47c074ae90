"""Extracted e-graph program -> a new FX GraphModule in the fusion dialect.

Invariants kept: placeholders (names, order) and the output structure are copied as they are;
an FX node whose original e-node was chosen is copied with its name and meta; every new node gets
`meta["val"]` by running its op on the fake inputs (under the graph's fake mode). Non-modelled
nodes are copied in order with their arguments remapped; modelled nodes are emitted on demand
(children first, iteratively, so 3,000-deep chains do not recurse).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch.fx import Graph, GraphModule, Node

import fusion.dialect.ops  # noqa: F401  (registers torch.ops.fusion.*)
from fusion.extract.ilp import EGraphExport, ENode, Ref
from fusion.dialect.graph_walk import reaches
from fusion.rewrite.egraph import LOGICAL
from fusion.rewrite.errors import RewriteError
from fusion.dialect.values import is_symbolic_id
from fusion.rewrite.insert import ABSENT, CHECK_ONLY, Inserted, Scalar, Shape

aten = torch.ops.aten
_REDUCE = {"sum": aten.sum.dim_IntList, "mean": aten.mean.dim, "amax": aten.amax.default, "amin": aten.amin.default}
_BINARY = {"add": aten.add.Tensor, "sub": aten.sub.Tensor, "mul": aten.mul.Tensor, "div": aten.div.Tensor}
#: fused e-graph op -> rule name reported in `fired`
RULE_OF = {"softmax": "softmax", "log_softmax": "log_softmax", "layer_norm": "layer_norm",
           "rms_norm": "rms_norm", "gelu": "gelu", "silu": "silu", "addmm": "linear", "attention": "attention",
           "glu": "glu"}
#: fused e-graph op -> its literal-dependent rule name suffix (gelu(x, "tanh") fires `gelu_tanh`)
_VARIANT = {"tanh": "_tanh", "quick": "_quick"}
#: glu's activation -> its fired key
_GLU = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}


def rule_name(op: str, literals: tuple) -> str:
    """The `fired` key of a fused e-node: `RULE_OF[op]`, with the variant of its first literal."""
    if op == "glu":
        return _GLU[str(literals[0])]
    return RULE_OF[op] + (_VARIANT.get(literals[0], "") if literals and isinstance(literals[0], str) else "")


#: a scalar factor (`fold_scale` in `fired` when one moved off a matrix product's operand)
_SCALING = {aten.mul.Tensor, aten.div.Tensor, aten.neg.default}
_PRODUCTS = {aten.mm.default, aten.addmm.default, aten.bmm.default}


def _feeds_matrix_product(n: Node) -> bool:
    """n is an operand of a matrix product, directly or through views and copies of it."""
    return reaches(n, lambda u: u.target in _PRODUCTS,
                   lambda u: u.target in _LAYOUT.values() or u.target in (aten.clone.default, aten._unsafe_view.default))

_LAYOUT = {"view": aten.view.default, "expand": aten.expand.default, "permute": aten.permute.default,
           "unsqueeze": aten.unsqueeze.default}


def _num(v: float) -> int | float:
    """An integral scalar as an int (as the captured graph wrote it), unless it is beyond int64: a mask's
    `finfo(float32).min` is integral but no ATen op takes it as an int."""
    return int(v) if float(v).is_integer() and abs(v) < 2 ** 53 else v


def call_of(node: ENode, a: list[Any]) -> tuple[Any, tuple, dict]:
    """(target, args, kwargs) of the ATen/fusion call computing e-node `node` from values `a`."""
    op, lit = node.op, node.literals
    if op in _BINARY:
        if not isinstance(a[0], Node):
            if op not in ("add", "mul"):
                raise RewriteError("rebuild", f"scalar first operand of {op}")
            a = [a[1], a[0]]
        return _BINARY[op], (a[0], a[1]), {}
    if op == "pow_":
        return aten.pow.Tensor_Scalar, (a[0], _num(lit[0])), {}
    if op == "unary":
        return getattr(aten, lit[0]).default, (a[0],), {}
    if op == "reduce":
        return _REDUCE[lit[0]], (a[0], [lit[1]], lit[2]), {}
    if op == "var_":
        return aten.var.correction, (a[0], [lit[0]]), {"correction": _num(lit[1]), "keepdim": lit[2]}
    if op in ("mm", "bmm", "addmm"):
        return getattr(aten, op).default, tuple(a), {}
    if op in ("softmax", "log_softmax"):
        return getattr(aten, f"_{op}").default, (a[0], lit[0], False), {}
    if op == "gelu" and lit[0] == "quick":
        return torch.ops.fusion.gelu_quick.default, (a[0],), {}
    if op == "gelu":
        return aten.gelu.default, (a[0],), ({"approximate": lit[0]} if lit[0] != "none" else {})
    if op == "silu":
        return aten.silu.default, (a[0],), {}
    if op == "glu" and lit[0] == "silu":
        return torch.ops.fusion.swiglu.default, (a[0], a[1]), {}
    if op == "glu":
        return torch.ops.fusion.geglu.default, (a[0], a[1], "tanh" if lit[0] == "gelu_tanh" else "none"), {}
    if op == "layer_norm":
        return torch.ops.fusion.layer_norm.default, (a[0], a[1], a[2], lit[0]), {}
    if op == "rms_norm":
        return torch.ops.fusion.rms_norm.default, (a[0], a[1], lit[0]), {}
    if op in _LAYOUT:
        return _LAYOUT[op], (a[0], list(lit[0]) if isinstance(lit[0], tuple) else lit[0]), {}
    if op == "cast":
        return aten._to_copy.default, (a[0],), {"dtype": getattr(torch, lit[0])}
    if op == "clone":   # the e-graph's clone is a layout op: it makes its input contiguous (what export's
        # clone before a view is for); aten's default (preserve_format) would keep a permuted input's strides
        return aten.clone.default, (a[0],), {"memory_format": torch.contiguous_format}
    if op == "where":
        if not isinstance(a[1], Node):
            return aten.where.ScalarSelf, tuple(a), {}
        return (aten.where.ScalarOther if not isinstance(a[2], Node) else aten.where.self), tuple(a), {}
    if op == "attention":
        return torch.ops.fusion.attention.default, (a[0], a[1], a[2], a[3], float(lit[0]), bool(lit[1])), {}
    if op in LOGICAL:
        raise RewriteError("rebuild", f"logical op {op!r} was extracted (its cost must keep it out)")
    raise RewriteError("rebuild", f"no FX form for e-graph op {op!r}")


def _size_value(d: int, ins: Inserted, lookup: Any) -> Any:
    """An int of a layout literal as an FX argument: itself, or (a symbolic size) the node computing it."""
    if not is_symbolic_id(d):
        return d
    node = ins.sizes.get(d)
    if node is None:
        raise RewriteError("rebuild", f"a view of a symbolic size no graph value computes (id {d})")
    return lookup(node)


def original_enodes(ex: EGraphExport, ins: Inserted) -> dict[Node, int]:
    """FX node -> the e-node inserted for it (found again in its let's e-class)."""
    leaf_cls = {("var", n.args[0]): n.cls for n in ex.nodes if n.op == "var"}
    leaf_cls.update({("scalar", n.args[0]): n.cls for n in ex.nodes if n.op == "scalar"})
    leaf_cls.update({("none",): n.cls for n in ex.nodes if n.op == "none"})  # noqa: B035 (one class)

    def key(a: Any) -> tuple:
        if isinstance(a, Node):
            return ("c", ex.lets[a.name] if a in ins.signatures else leaf_cls[("var", a.name)])
        if isinstance(a, Scalar):
            return ("c", leaf_cls[("scalar", a.value)])
        if a is ABSENT:
            return ("c", leaf_cls[("none",)])
        if isinstance(a, Shape):
            return ("l", tuple(a.dims))
        return ("l", a)

    out: dict[Node, int] = {}
    for n, sig in ins.signatures.items():
        try:
            want = tuple(key(a) for a in sig.args)
        except KeyError as e:
            raise RewriteError("extract", f"argument {e} of {n.name} not found in the e-graph", n.name) from None
        for j in ex.classes[ex.lets[n.name]]:
            node = ex.nodes[j]
            if node.op == sig.op and tuple(("c", int(x)) if isinstance(x, Ref) else ("l", x) for x in node.args) == want:
                out[n] = j
                break
        else:
            raise RewriteError("extract", f"inserted e-node of {n.name} ({sig.op}) not found", n.name)
    return out


def rebuild(gm: GraphModule, ins: Inserted, ex: EGraphExport, choice: dict[int, int],
            orig: dict[Node, int]) -> tuple[GraphModule, dict[str, list[str]]]:
    graph = Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    fake_mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes])
    owner = {j: n for n, j in orig.items()}
    env: dict[Node, Node] = {}
    built: dict[int, Any] = {}
    fused_at: list[tuple[int, str]] = []

    def lookup(a: Node) -> Any:
        return env[a] if a in env else built[ex.lets[a.name]]

    def emit(cls: int) -> None:
        node = ex.nodes[choice[cls]]
        if node.op == "var":
            leaf = ins.leaves[node.args[0]]
            if leaf not in env:
                raise RewriteError("rebuild", "leaf used before it is defined", leaf.name)
            built[cls] = env[leaf]
        elif node.op == "scalar":
            built[cls] = _num(node.args[0])
        elif node.op == "none":
            built[cls] = None
        elif node.id in owner:
            built[cls] = graph.node_copy(owner[node.id], lookup)
        else:
            target, args, kwargs = call_of(node, [built[ch] for ch in node.children])
            if node.op in _LAYOUT and isinstance(args[1], list):   # symbolic sizes: the FX values computing them
                args = (args[0], [_size_value(d, ins, lookup) for d in args[1]])
            new = graph.call_function(target, args, kwargs)
            new.meta["val"] = _fake_run(fake_mode, target, args, kwargs, new)
            built[cls] = new
            if node.op in RULE_OF:
                fused_at.append((cls, rule_name(node.op, node.literals)))

    def materialise(root: int) -> Any:
        stack = [(root, False)]
        while stack:
            cls, ready = stack.pop()
            if cls in built:
                continue
            if cls not in choice:
                raise RewriteError("rebuild", f"e-class {cls} has no chosen e-node")
            if ready:
                emit(cls)
                continue
            stack.append((cls, True))
            stack.extend((ch, False) for ch in ex.nodes[choice[cls]].children if ch not in built)
        return built[root]

    for n in gm.graph.nodes:
        if n in ins.signatures:
            if n in ins.roots:
                env[n] = materialise(ex.lets[n.name])
                if not isinstance(env[n], Node):
                    raise RewriteError("rebuild", f"value of {n.name} became the constant {env[n]!r}", n.name)
                if env[n].op == "placeholder":   # e.g. x*1 -> x: never alias a graph input as a result
                    env[n] = graph.call_function(aten.clone.default, (env[n],))
                    env[n].meta["val"] = n.meta["val"]
            continue
        if n.target in CHECK_ONLY and any(a in ins.signatures and ex.lets[a.name] not in built
                                          for a in n.all_input_nodes):
            continue   # checks a value that is no longer computed (fused away)
        for a in n.all_input_nodes:
            if a in ins.signatures and a not in env:
                env[a] = materialise(ex.lets[a.name])
        env[n] = graph.node_copy(n, lambda a: env[a])

    graph.eliminate_dead_code()
    graph.lint()
    new_gm = GraphModule(gm, graph, class_name=type(gm).__name__)
    new_gm.meta.update(gm.meta)
    return new_gm, _fired(gm, ins, ex, built, fused_at)


def _fake_run(fake_mode: Any, target: Any, args: tuple, kwargs: dict, new: Node) -> Any:
    def val(a: Any) -> Any:   # sizes of a view's shape list may be nodes too (symbolic sizes)
        return [val(x) for x in a] if isinstance(a, list) else a.meta["val"] if isinstance(a, Node) else a
    vargs = tuple(val(a) for a in args)
    vkwargs = {k: val(v) for k, v in kwargs.items()}
    try:
        if fake_mode is None:
            from torch._subclasses.fake_tensor import FakeTensorMode
            fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        with fake_mode:
            return target(*vargs, **vkwargs)
    except Exception as e:
        raise RewriteError("rebuild", f"cannot compute meta['val'] of {target}: {e}", new.name) from e


def _fired(gm: GraphModule, ins: Inserted, ex: EGraphExport, built: dict[int, Any],
           fused_at: list[tuple[int, str]]) -> dict[str, list[str]]:
    """rule -> original FX nodes that no longer exist because the fused op replaced them."""
    by_class: dict[int, list[Node]] = {}
    for n in ins.signatures:
        by_class.setdefault(ex.lets[n.name], []).append(n)
    fired: dict[str, list[str]] = {}
    claimed: set[Node] = set()
    for cls, rule in fused_at:
        names = fired.setdefault(rule, [])
        stack = list(by_class.get(cls, []))
        while stack:
            n = stack.pop()
            if n in claimed:
                continue
            claimed.add(n)
            names.append(n.name)
            stack.extend(a for a in n.all_input_nodes
                         if a in ins.signatures and (ex.lets[a.name] not in built or a in by_class.get(cls, [])))
    for n in ins.signatures:   # a scalar factor no longer applied to a matrix operand (rules/linear.py)
        if (n.target in _SCALING and n not in claimed and ex.lets[n.name] not in built
                and all(isinstance(a, (int, float)) for a in n.args[1:])
                and _feeds_matrix_product(n)):
            fired.setdefault("fold_scale", []).append(n.name)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    return {r: sorted(v, key=order.__getitem__) for r, v in fired.items() if v}
