"""Fusion coverage: every softmax / norm / activation / attention site of a program, and whether it fused.

The rewrite rules recognise spellings. A spelling they miss is silent: the model runs, only slower. This
module reads the program as it leaves rewriting and lists each site, so a miss is visible with its location:

- fused sites are the fused ops (`fusion.dialect.ops.FUSED_OPS`) and ATen's own fused forms (SDPA,
  `native_layer_norm`, `_fused_rms_norm`);
- unfused sites are the characteristic ATen ops of a hand-written form that no rule absorbed:

      softmax      exp -> (<= 2 pointwise ops) -> sum over a dim -> (<= 2 pointwise ops) -> div / mul of the exp
      log_softmax  the same exp and sum, the sum's log subtracted from something
      norm         rsqrt / sqrt / pow(., +-0.5) of a mean / var / sum over a dim (through <= 2 ops: + eps, views)
      activation   erf or tanh inside a GELU (a product with a constant in, <= 1 op before, + 1 out);
                   sigmoid(y) * a tensor
      attention    a softmax (fused or not) between two matrix products: softmax(q k^T) v left as GEMM +
                   softmax + GEMM (through views, permutes, casts and pointwise ops: scale, mask)

The detection is conservative on purpose (a few ops, short paths): it points at likely misses, it proves
nothing. One site per instance: an unfused softmax is reported once, at its exp. A softmax inside an unfused
attention is reported twice, as what it is (a softmax, fused or not) and as the attention it did not join:
both are true, and the attention line is the one that costs (two GEMMs and the scores in memory).

`where`: the module path (`nn_module_stack`), else the user's source line (`stack_trace`); for a node a rule
made (no meta) the same-named node before rewriting, or a neighbour, lends its location.
"""
from __future__ import annotations

import operator
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from fusion.dialect.ops import FUSED_OPS

#: the kind of each fused op (FUSED_OPS short names) and of ATen's fused forms (by op name)
_KIND = {"softmax": "softmax", "log_softmax": "log_softmax", "gelu": "activation", "gelu_tanh": "activation",
         "silu": "activation", "gelu_quick": "activation", "swiglu": "gated", "geglu": "gated", "glu": "gated",
         "layer_norm": "norm", "rms_norm": "norm", "attention": "attention", "sdpa": "attention"}
_ATEN_FUSED = {"scaled_dot_product_attention": "sdpa", "_scaled_dot_product_flash_attention_for_cpu": "sdpa",
               "_scaled_dot_product_flash_attention": "sdpa", "_scaled_dot_product_efficient_attention": "sdpa",
               "native_layer_norm": "layer_norm", "_fused_rms_norm": "rms_norm"}
KINDS = ("softmax", "log_softmax", "norm", "activation", "gated", "attention")

_LAYOUT = {"view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "clone", "unsqueeze",
           "squeeze", "alias", "_to_copy"}
_MATMUL = {"bmm", "mm", "matmul"}
_REDUCTION = {"mean", "var", "sum", "var_mean"}


@dataclass
class Site:
    """One softmax / norm / activation / attention site: `op` is the fused op, or the ATen ops left."""

    kind: str
    fused: bool
    op: str
    node: str
    where: str = ""
    priced_out: bool = False   # unfused, but a rule did offer the fused form: the cost model kept this one


def _op(n: Any) -> str:
    """The ATen (or prims) op name of a call_function node, overloads alike; '' for anything else."""
    ok = isinstance(n, fx.Node) and n.op == "call_function" and getattr(n.target, "namespace", None) in ("aten", "prims")
    return n.target.overloadpacket.__name__ if ok else ""


def _pointwise(n: fx.Node) -> bool:
    return isinstance(n.target, torch._ops.OpOverload) and torch.Tag.pointwise in n.target.tags


def _carries(n: fx.Node) -> bool:
    """Ops a value passes through between the ops of one site: layout, casts, pointwise (scale, mask, eps),
    getitem (var_mean's outputs)."""
    return _op(n) in _LAYOUT or _pointwise(n) or n.target is operator.getitem


def _reach(start: fx.Node, hops: int, down: bool, through: Callable[[fx.Node], bool]) -> list[fx.Node]:
    """Nodes reached from `start` (down: via users, else via inputs) with <= `hops` nodes between, each `through`."""
    found: list[fx.Node] = []
    frontier, seen = [start], {start}
    for _ in range(hops + 1):
        nxt = [m for n in frontier for m in (n.users if down else n.all_input_nodes) if m not in seen]
        seen.update(nxt)
        found += nxt
        frontier = [m for m in nxt if through(m)]
    return found


def _over_dim(n: fx.Node) -> bool:
    """A reduction over given dims (not over the whole tensor: a loss, a global norm)."""
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    return bool(dims) or dims == 0


def _number(n: fx.Node, value: float | None = None) -> bool:
    """Has a Python-number operand (equal to `value` when given)."""
    return any(type(a) in (int, float) and (value is None or a == value) for a in n.args)  # bools excluded


# ------------------------------------------------------------------------------------------ detection
def _same_exp(a: fx.Node, e: fx.Node) -> bool:
    """`a` is exp node `e`, or an exp of the same input (`x.exp() / x.exp().sum()`: export does not CSE)."""
    return a is e or (_op(a) == "exp" and a.args[:1] == e.args[:1])


def _softmax(e: fx.Node) -> tuple[str, str, fx.Node] | None:
    """(kind, ops left, output node) when exp node `e` is a spelled-out softmax or log_softmax."""
    near = _reach(e, 2, True, _pointwise)
    for s in near:
        if _op(s) != "sum" or not _over_dim(s):
            continue
        after = _reach(s, 2, True, _pointwise)
        for d in after:
            if _op(d) == "log" and any(_op(u) == "sub" for u in _reach(d, 1, True, _pointwise)):
                return "log_softmax", "exp+sum+log", d
            if _op(d) in ("div", "mul") and any(_same_exp(a, e) or (a in near and a is not s and a not in after)
                                                 for a in d.all_input_nodes):
                return "softmax", f"exp+sum+{_op(d)}", d
    return None


def _norm(r: fx.Node) -> str | None:
    """The ops left when `r` (rsqrt, sqrt, pow(., +-0.5)) normalises by a reduction over a dim."""
    name = _op(r)
    if name == "pow" and not _number(r, 0.5) and not _number(r, -0.5):
        return None
    for m in _reach(r, 2, False, _carries):
        if _op(m) in _REDUCTION and _over_dim(m):
            return f"{_op(m)}+{name}"
    return None


def _activation(n: fx.Node) -> str | None:
    """The ops left when `n` is the erf / tanh of a spelled-out GELU, or a sigmoid gating a tensor."""
    name = _op(n)
    if name in ("erf", "tanh"):
        scaled = any(_op(a) in ("mul", "div") and _number(a) for a in _reach(n, 1, False, _pointwise))
        plus_one = any(_op(u) == "add" and _number(u, 1) for u in n.users)
        return f"{name}+add" if scaled and plus_one else None
    gates = any(_op(u) == "mul" and any(a is not n and isinstance(a.meta.get("val"), torch.Tensor)
                                         for a in u.all_input_nodes) for u in n.users)
    return "sigmoid+mul" if name == "sigmoid" and gates else None


def _attention(soft_in: fx.Node, soft_out: fx.Node, softmax: str) -> str | None:
    """The ops left when a softmax (`soft_in` to `soft_out`, spelled `softmax`) is between q k^T and its v product."""
    before = [_op(m) for m in _reach(soft_in, 4, False, _carries) if _op(m) in _MATMUL]
    after = [_op(m) for m in _reach(soft_out, 3, True, _carries) if _op(m) in _MATMUL]
    return f"{before[0]}+{softmax}+{after[0]}" if before and after else None


def coverage(program_gm: fx.GraphModule, source_gm: fx.GraphModule | None = None) -> list[Site]:
    """The softmax / norm / activation / attention sites of `program_gm` (the graph as it leaves rewriting),
    in graph order; `source_gm` (the graph before rewriting) lends locations by node name where the program's
    nodes lost their meta (a rewrite cache hit)."""
    source = {n.name: n for n in source_gm.graph.nodes} if source_gm is not None else {}
    sites: list[Site] = []

    def add(anchor: fx.Node, kind: str, fused: bool, op: str) -> None:
        sites.append(Site(kind, fused, op, anchor.name, _where(anchor, source)))

    for n in program_gm.graph.nodes:
        name = _op(n)                                        # '' for placeholders, output, getitem
        short = FUSED_OPS.get(n.target) or _ATEN_FUSED.get(name)
        if short == "gelu" and n.kwargs.get("approximate", "none") == "tanh":
            short = "gelu_tanh"
        att = None
        if short is not None:
            add(n, _KIND[short], True, short)
            if short == "softmax":
                att = _attention(n, n, "softmax")           # fused, but not into attention
        elif name == "exp" and (soft := _softmax(n)) is not None:
            kind, ops, out = soft
            add(n, kind, False, ops)
            if kind == "softmax":
                att = _attention(n, out, ops)
        elif name in ("rsqrt", "sqrt", "pow") and (ops := _norm(n)):
            add(n, "norm", False, ops)
        elif name in ("erf", "tanh", "sigmoid") and (ops := _activation(n)):
            add(n, "activation", False, ops)
        if att:
            add(n, "attention", False, att)
    return sites


def coverage_records(program_gm: fx.GraphModule, source_gm: fx.GraphModule | None = None,
                     offered: Sequence[str] = ()) -> list[dict]:
    """`coverage` as plain dicts: what CompileLog.coverage holds (JSON-able, stored with saved programs).

    `offered`: the fused ops the rewrite's e-graph held (rewrite stats "offered"). An unfused attention site
    where the e-graph held an attention call was a cost decision (GEMM + fused softmax + GEMM priced cheaper
    than one SDPA call, as it is at small heads on some CPUs), not a missed spelling: it is marked
    `priced_out`. Graph-level: the e-graph held one somewhere (a model's attention layers are alike). Only
    attention: the other fused forms are in the e-graph whenever the input already used them (`_softmax`)."""
    attention_offered = "attention" in offered
    sites = coverage(program_gm, source_gm)
    for site in sites:
        site.priced_out = attention_offered and not site.fused and site.kind == "attention"
    return [asdict(site) for site in sites]


def coverage_of(opt: Any) -> list[Site]:
    """The sites of every compiled graph of `opt` (what `fusion.optimize` returns): from each graph's log,
    or found on its program as rewritten when the log has none (rewrites off, a program saved before)."""
    sites: list[Site] = []
    for g in opt.graphs:
        recorded = getattr(g.log, "coverage", None) or []
        sites += [Site(**d) for d in recorded] if recorded else coverage(g.program_gm, g.source_gm)
    return sites


# ------------------------------------------------------------------------------------------ locations
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _location(meta: dict) -> str:
    """The module path of a node (last nn_module_stack entry), else its innermost user source line."""
    stack = meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        # Dynamo spells paths as Python (L['self'].layer[0]); export as dotted names (layer.0)
        path = re.sub(r"^L\['self'\]\.?", "", str(path))
        path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path).lstrip(".")
        if path:
            return path
    frames = re.findall(r'File "([^"]+)", line (\d+)', meta.get("stack_trace") or "")
    user = [f for f in frames if not f[0].startswith(_TORCH_DIR)] or frames
    return f"{os.path.basename(user[-1][0])}:{user[-1][1]}" if user else ""


def _where(n: fx.Node, source: dict[str, fx.Node]) -> str:
    for m in (n, source.get(n.name), *n.users, *n.all_input_nodes):   # rule-made nodes carry no meta
        if m is not None and m.op == "call_function":
            w = _location(m.meta)
            if w:
                return w
    return ""


def format_coverage(sites: Sequence[Site | dict]) -> str:
    """A short table: per kind, fused of total (and the fused ops); then one line per site NOT fused, with
    the ATen ops left, the node and where it is. '' when there are no sites."""
    sites = [s if isinstance(s, Site) else Site(**s) for s in sites]
    if not sites:
        return ""
    missed = [s for s in sites if not s.fused]
    lines = [f"  {len(sites)} sites, {len(missed)} unfused"]
    for kind in sorted({s.kind for s in sites}, key=lambda k: KINDS.index(k) if k in KINDS else len(KINDS)):
        of = [s for s in sites if s.kind == kind]
        ops = Counter(s.op for s in of if s.fused)
        shown = f"  ({', '.join(f'{op} x{c}' for op, c in sorted(ops.items()))})" if ops else ""
        lines.append(f"  {kind:<12} {sum(s.fused for s in of):>4} / {len(of):<4} fused{shown}")
    for s in missed:
        why = "  (a rule offered the fused form; the cost model priced this one cheaper)" if s.priced_out else ""
        lines.append(f"  NOT FUSED {s.kind:<12} {s.op:<20} at {s.node:<18} {s.where or '(location unknown)'}{why}")
    return "\n".join(lines)
