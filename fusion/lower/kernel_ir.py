"""Expansion of a scheduled group into a primitive DAG (the kernel IR).

Each primitive is either *vec* (varies along the last dim j) or *row* (one value per row), with
dtype "f" (float32) or "b" (bool). Reductions turn a vec value into a row value; `lvl` counts
reductions upstream, which decides the loop ("phase") a value is computed in.

`build` also plans the kernel once (`plan_loops` -> `KernelIR.plan`, a LoopPlan): the prims the outputs
need, the loops of a row kernel (loop k computes what reductions of level k+1 and outputs of level k need),
the row values computed between the loops, and the vec values kept in a per-thread scratch row. The C++
and Triton renderers only print that plan.

bf16 buffers (C++ path; the scheduler admits bf16 nodes on the CPU only in the approximate "bf16" mode): an
input or output whose node is bfloat16 has `bf16=True` — loaded as bf16 and widened to fp32, stored
rounded to nearest even. Arithmetic stays fp32; the value of every bf16 member node is rounded to bf16
(`round_bf16`) where eager PyTorch rounds it (each bf16 op computes in fp32 and rounds its result), so a
kernel computes what the graph does, op by op, and a bf16 output stores that rounded value exactly.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from fusion.dialect.values import is_one, tval
from fusion.lower import schedule as S

aten = torch.ops.aten

#: primitives that evaluate a transcendental function (counted, and stored rather than recomputed)
TRANSCENDENTAL = {"exp", "log", "tanh", "erf", "sigmoid", "silu", "gelu", "gelu_tanh", "gelu_quick", "powf"}
REDUCE = {"sum", "amax", "amin"}


@dataclass
class Prim:
    op: str
    args: tuple            # prim ids (int) for operands; python constants for "const"/"load"
    vec: bool
    dtype: str             # "f" | "b"
    lvl: int


@dataclass
class Input:
    node: fx.Node
    mode: str              # "full" (right-aligned to D) | "droplast" (right-aligned to D[:-1])
    dtype: str             # "f" | "b"
    vec: bool              # inner stride specialised to 1 (True) or 0 (False)
    rank: int              # rank of the tensor
    rot: bool = False      # read as rotate_half: j < N/2 ? -x[j + N/2] : x[j - N/2] (C++ path only)
    bf16: bool = False     # stored as bfloat16 (dtype "f": widened to fp32 on load; C++ path)


@dataclass
class Output:
    node: fx.Node
    prim: int
    form: str              # "full" | "rowk" | "rown"
    dtype: str
    bf16: bool = False     # stored as bfloat16, rounded to nearest even (C++ path)


@dataclass
class KernelIR:
    name: str
    D: list
    prims: list[Prim] = field(default_factory=list)
    inputs: list[Input] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    members: list[fx.Node] = field(default_factory=list)
    plan: LoopPlan | None = None             # loops, row values, scratch rows: set by `build`

    @property
    def has_reduction(self) -> bool:
        return any(p.op in REDUCE for p in self.prims)


class UnsupportedError(Exception):
    pass


class Builder:
    def __init__(self, ir: KernelIR):
        self.ir = ir
        self.cse: dict = {}
        self.inputs: dict = {}

    def _add(self, op: str, args: tuple, vec: bool, dtype: str, lvl: int) -> int:
        key = (op, args)
        if key in self.cse:
            return self.cse[key]
        self.ir.prims.append(Prim(op, args, vec, dtype, lvl))
        i = len(self.ir.prims) - 1
        self.cse[key] = i
        return i

    def const(self, v: Any) -> int:
        v = float(v) if not isinstance(v, bool) else v
        if isinstance(v, bool):
            return self._add("constb", (v,), False, "b", 0)
        return self._add("const", (v,), False, "f", 0)

    def nf(self) -> int:
        return self._add("N", (), False, "f", 0)

    def load(self, node: fx.Node, mode: str, rot: bool = False) -> int:
        key = (node, mode, rot)
        if key not in self.inputs:
            D = self.ir.D
            v = tval(node)
            shape = list(v.shape)
            if mode == "full":
                vec = len(shape) >= 1 and not is_one(shape[-1]) and not is_one(D[-1])
            else:
                vec = False
            dt = "f" if v.dtype.is_floating_point else "b"
            if rot and not vec:
                raise UnsupportedError(f"rotate_half of {node.name} without a last dim")
            self.ir.inputs.append(Input(node, mode, dt, vec, len(shape), rot, bf16=v.dtype == torch.bfloat16))
            self.inputs[key] = len(self.ir.inputs) - 1
        k = self.inputs[key]
        inp = self.ir.inputs[k]
        return self._add("load", (k,), inp.vec, inp.dtype, 0)

    def op(self, op: str, *args: int) -> int:
        ps = [self.ir.prims[a] for a in args]
        vec = any(p.vec for p in ps)
        lvl = max((p.lvl for p in ps), default=0)
        dtype = "b" if op in S.COMPARE or op == "not" else "f"
        if op == "div" and not ps[1].vec and vec:          # x / row  ->  x * (1/row), once per row
            return self.op("mul", args[0], self.op("recip", args[1]))
        if op == "where" and ps[0].op == "constb":
            return args[1] if ps[0].args[0] else args[2]
        if all(p.op == "const" for p in ps) and op in ("add", "sub", "mul", "div", "neg"):
            # folded in float32 with IEEE semantics (1/0 = inf, 0/0 = nan), as the kernel would compute it
            a = [torch.tensor(p.args[0], dtype=torch.float32) for p in ps]
            r = {"add": lambda: a[0] + a[1], "sub": lambda: a[0] - a[1], "mul": lambda: a[0] * a[1],
                 "div": lambda: a[0] / a[1], "neg": lambda: -a[0]}[op]()
            return self.const(float(r.item()))
        return self._add(op, tuple(args), vec, dtype, lvl)

    def round_bf16(self, x: int) -> int:
        """x rounded to bf16 precision (kept in fp32), unless it already is: a bf16 load or a rounding."""
        p = self.ir.prims[x]
        if p.op == "round_bf16" or p.dtype != "f" or (p.op == "load" and self.ir.inputs[p.args[0]].bf16):
            return x
        if p.op == "const":
            return self.const(float(torch.tensor(p.args[0]).to(torch.bfloat16).float().item()))
        return self._add("round_bf16", (x,), p.vec, "f", p.lvl)

    def reduce(self, op: str, x: int) -> int:
        p = self.ir.prims[x]
        if not p.vec:                                      # reduction of a row-constant value
            return self.op("mul", x, self.nf()) if op == "sum" else x
        return self._add(op, (x,), False, "f", p.lvl + 1)


def _f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32).item())


def build(g: S.Group, name: str) -> KernelIR:
    """Expand the members of g into primitives; raises UnsupportedError for unexpected forms."""
    ir = KernelIR(name=name, D=list(g.D), members=list(g.members))
    b = Builder(ir)
    env: dict[fx.Node, int] = {}

    for n in g.members:
        form = g.form[n]
        amode = "droplast" if form == "rown" and n.target not in S.REDUCTIONS else "full"

        def A(a: Any) -> int:
            if isinstance(a, fx.Node):
                return env[a] if a in env else b.load(a, amode)
            if isinstance(a, bool):
                return b.const(float(a))
            if isinstance(a, (int, float)):
                return b.const(_f32(a))
            raise UnsupportedError(f"operand {a!r} of {n.name}")

        env[n] = _expand(n, form, A, b, g)
        v = tval(n)
        if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 and v.device.type == "cpu":
            env[n] = b.round_bf16(env[n])                  # where eager rounds: every bf16 op's result

    for n in S.group_outputs(g):
        v = tval(n)
        bf16 = v.dtype == torch.bfloat16 and v.device.type == "cpu"
        ir.outputs.append(Output(n, env[n], g.form[n], ir.prims[env[n]].dtype, bf16=bf16))
    ir.plan = plan_loops(ir)
    return ir


def _expand(n: fx.Node, form: str, A, b: Builder, g: S.Group) -> int:
    """The prim computing member n: a view or rotate_half reads its operand, the rest expand by family.

    `A` maps an operand (node or Python number) to its prim; raises UnsupportedError for unknown forms."""
    t = n.target
    if t is operator.getitem or t in S.VIEWS:
        return A(n.args[0])
    if t is S.rotate_half:
        return b.load(n.args[0], "full", rot=True)
    if t in S.POINTWISE:
        return _expand_pointwise(n, S.POINTWISE[t], A, b)
    if t in S.REDUCTIONS:
        r = _expand_reduction(n, S.REDUCTIONS[t], A(n.args[0]), b)
        if r is not None:
            return r
    if t in S.ROW_FUSED:
        r = _expand_row_fused(n, S.ROW_FUSED[t], A(n.args[0]), A, b)
        if r is not None:
            return r
    raise UnsupportedError(f"no expansion for {t} ({n.name})")


def _expand_pointwise(n: fx.Node, p: str, A, b: Builder) -> int:
    """Pointwise op p (S.POINTWISE's name) of node n: one prim, or a few for composite ops."""
    args = n.args
    if p in ("add", "sub", "mul", "div", "max", "min") or p in S.COMPARE:
        return b.op(p, A(args[0]), A(args[1]))
    if p == "rsub":
        return b.op("sub", A(args[1]), A(args[0]))
    if p == "pow":
        return _expand_pow(A(args[0]), float(args[1]), b)
    if p == "clamp":
        lo = args[1] if len(args) > 1 else n.kwargs.get("min")
        hi = args[2] if len(args) > 2 else n.kwargs.get("max")
        return _expand_clamp(A(args[0]), lo, hi, A, b)
    if p == "clamp_min":
        return b.op("max", A(args[0]), A(args[1]))
    if p == "clamp_max":
        return b.op("min", A(args[0]), A(args[1]))
    if p == "where":
        return b.op("where", A(args[0]), A(args[1]), A(args[2]))
    if p == "masked_fill":
        return b.op("where", A(args[1]), A(args[2]), A(args[0]))
    if p == "gelu":
        approx = n.kwargs.get("approximate", args[1] if len(args) > 1 else "none")
        return b.op("gelu_tanh" if approx == "tanh" else "gelu", A(args[0]))
    if p == "swiglu":                                      # silu(g) * u
        return b.op("mul", b.op("silu", A(args[0])), A(args[1]))
    if p == "geglu":                                       # gelu(g, approximate) * u
        return b.op("mul", b.op("gelu_tanh" if args[2] == "tanh" else "gelu", A(args[0])), A(args[1]))
    return b.op(p, A(args[0]))


def _expand_pow(x: int, e: float, b: Builder) -> int:
    """x ** e for a constant exponent: small exponents as products, roots and reciprocals, else powf."""
    table = {1.0: lambda: x, 2.0: lambda: b.op("mul", x, x), 0.5: lambda: b.op("sqrt", x),
             -1.0: lambda: b.op("recip", x), -0.5: lambda: b.op("rsqrt", x),
             3.0: lambda: b.op("mul", b.op("mul", x, x), x),
             0.0: lambda: b.const(1.0), -2.0: lambda: b.op("recip", b.op("mul", x, x))}
    if e in table:
        return table[e]()
    return b.op("powf", x, b.const(_f32(e)))


def _expand_clamp(x: int, lo: Any, hi: Any, A, b: Builder) -> int:
    """clamp(x, lo, hi) as max then min; a bound that is None is left out."""
    if lo is not None:
        x = b.op("max", x, A(lo))
    if hi is not None:
        x = b.op("min", x, A(hi))
    return x


def _expand_reduction(n: fx.Node, r: str, x: int, b: Builder) -> int | None:
    """Last-dim reduction r (S.REDUCTIONS' name) of prim x; None for a reduction it does not know."""
    if r == "sum":
        return b.reduce("sum", x)
    if r == "mean":
        return b.op("mul", b.reduce("sum", x), b.op("recip", b.nf()))
    if r in ("amax", "amin"):
        return b.reduce(r, x)
    if r == "var":
        corr = n.kwargs.get("correction", 1)
        corr = 1 if corr is None else corr
        mean = b.op("mul", b.reduce("sum", x), b.op("recip", b.nf()))
        d = b.op("sub", x, mean)
        ss = b.reduce("sum", b.op("mul", d, d))
        return b.op("div", ss, b.op("sub", b.nf(), b.const(float(corr))))
    return None


def _expand_row_fused(n: fx.Node, f: str, x: int, A, b: Builder) -> int | None:
    """Row-fused op f (S.ROW_FUSED's name: softmax, log_softmax, layer_norm, rms_norm) of prim x; None
    for one it does not know."""
    if f == "softmax":
        m = b.reduce("amax", x)
        e = b.op("exp", b.op("sub", x, m))
        return b.op("div", e, b.reduce("sum", e))
    if f == "log_softmax":
        m = b.reduce("amax", x)
        d = b.op("sub", x, m)
        return b.op("sub", d, b.op("log", b.reduce("sum", b.op("exp", d))))
    if f == "layer_norm":
        return _expand_layer_norm(n, x, A, b)
    if f == "rms_norm":
        w, eps = n.args[1], n.args[2]
        ms = b.op("mul", b.reduce("sum", b.op("mul", x, x)), b.op("recip", b.nf()))
        y = b.op("mul", x, b.op("rsqrt", b.op("add", ms, b.const(_f32(eps)))))
        return b.op("mul", y, A(w)) if w is not None else y
    return None


def _expand_layer_norm(n: fx.Node, x: int, A, b: Builder) -> int:
    """(x - mean) * rsqrt(var + eps) [* w] [+ bias], for fusion.layer_norm and aten.native_layer_norm."""
    args = n.args
    if n.target is aten.native_layer_norm.default:
        w, bias, eps = args[2], args[3], args[4]
    else:
        w, bias, eps = args[1], args[2], args[3]
    invn = b.op("recip", b.nf())
    mean = b.op("mul", b.reduce("sum", x), invn)
    d = b.op("sub", x, mean)
    var = b.op("mul", b.reduce("sum", b.op("mul", d, d)), invn)
    y = b.op("mul", d, b.op("rsqrt", b.op("add", var, b.const(_f32(eps)))))
    if w is not None:
        y = b.op("mul", y, A(w))
    if bias is not None:
        y = b.op("add", y, A(bias))
    return y


# ----------------------------------------------------------------------------------- kernel plan
#: prims that end a walk over operands: their args are not prim ids (input index, constant) or none
LEAVES = ("load", "const", "constb", "N")


def reach(prims: list[Prim], roots: list[int], stop: frozenset = frozenset(), through: bool = False) -> set[int]:
    """The prims needed to evaluate `roots` (roots included). The walk over operands ends at leaves, at
    `stop` prims (values a loop reads back from a scratch row) and, unless `through`, at reductions (a
    loop reads their row value, computed by an earlier loop)."""
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        p = prims[i]
        if i in stop or p.op in LEAVES or (p.op in REDUCE and not through):
            continue
        stack.extend(p.args)
    return seen


@dataclass(frozen=True)
class Loop:
    """Phase k of a row kernel: one loop over the columns j of a row, computing what the reductions of
    level k+1 and the vec outputs of level k need. Prim ids are in IR (topological) order."""

    rows: tuple[int, ...]           # row values computed just before this loop (their reductions are done)
    reductions: tuple[int, ...]     # reductions accumulated here: their operand has level k
    outputs: tuple[int, ...]        # indices into ir.outputs of the vec outputs stored here
    needs: tuple[int, ...]          # vec prims the loop evaluates when it recomputes every value
    body: tuple[int, ...]           # vec prims it evaluates or reads when scratch rows are kept
    reads: tuple[int, ...]          # prims of body read back from the scratch row an earlier loop stored
    writes: tuple[int, ...]         # prims of body this loop stores into their scratch row


@dataclass(frozen=True)
class LoopPlan:
    """How a kernel evaluates its prims: what the outputs need, the loops ("phases") of a row kernel, and
    the values kept in per-thread scratch rows. Computed once by `plan_loops`; the renderers print it (the
    C++ row kernels keep scratch rows, the Triton loops recompute `needs`)."""

    needed: tuple[int, ...]         # prims the outputs need, through reductions
    vec_outputs: tuple[int, ...]    # indices into ir.outputs stored per element (in the loops)
    row_outputs: tuple[int, ...]    # indices into ir.outputs stored once per row (after the loops)
    loops: tuple[Loop, ...]         # loop k is phase k
    rows_after: tuple[int, ...]     # row values computed after the last loop
    scratch: tuple[int, ...]        # prims kept in a scratch row; slot s holds scratch[s]

    @property
    def n_scratch(self) -> int:
        """Per-thread scratch rows of a kernel that keeps them (the C++ row kernels)."""
        return len(self.scratch)

    def slot(self, i: int) -> int:
        """The scratch row (0-based) that holds prim i."""
        return self.scratch.index(i)


def plan_loops(ir: KernelIR) -> LoopPlan:
    """The LoopPlan of ir: loop k computes what reductions of level k+1 and outputs of level k need."""
    P = ir.prims
    needed = reach(P, [o.prim for o in ir.outputs], through=True)
    # the reductions the outputs need: every reduction of the IR, as `build` leaves no unused prim
    reds = [i for i in sorted(needed) if P[i].op in REDUCE]
    vec_outs = [k for k, o in enumerate(ir.outputs) if P[o.prim].vec or o.form == "full"]
    nloops = max([P[P[i].args[0]].lvl + 1 for i in reds] + [P[ir.outputs[k].prim].lvl + 1 for k in vec_outs],
                 default=0)
    here = [tuple(i for i in reds if P[P[i].args[0]].lvl == k) for k in range(nloops)]
    outs = [tuple(q for q in vec_outs if P[ir.outputs[q].prim].lvl == k) for k in range(nloops)]
    roots = [[P[i].args[0] for i in here[k]] + [ir.outputs[q].prim for q in outs[k]] for k in range(nloops)]
    needs = [tuple(i for i in sorted(reach(P, roots[k])) if P[i].vec) for k in range(nloops)]
    first = _scratch_rows(P, needs)
    rows = _row_stages(P, needed, nloops)
    loops = []
    for k in range(nloops):
        stop = frozenset(i for i, f in first.items() if f < k)
        body = tuple(i for i in sorted(reach(P, roots[k], stop)) if P[i].vec)
        loops.append(Loop(rows[k], here[k], outs[k], needs[k], body,
                          tuple(i for i in body if i in stop), tuple(i for i in body if first.get(i) == k)))
    row_outs = tuple(k for k in range(len(ir.outputs)) if k not in vec_outs)
    return LoopPlan(tuple(sorted(needed)), tuple(vec_outs), row_outs, tuple(loops), rows[nloops],
                    tuple(sorted(first)))


def _scratch_rows(P: list[Prim], needs: list[tuple[int, ...]]) -> dict[int, int]:
    """The vec values stored once in a scratch row (L1), each -> the first loop, which computes and stores
    it; later loops read it back. `needs[k]`: the vec prims loop k needs when it recomputes everything.

    Kept: values several loops need that are transcendental, or the outermost value of a prologue that
    several loops would recompute (e.g. s * 0.125 + mask before softmax's max and exp-sum loops, x +
    residual before a norm's loops), whose inner values are then not stored: later loops read the outer one."""
    loops_of: dict[int, set] = {}
    for k, ns in enumerate(needs):
        for i in ns:
            loops_of.setdefault(i, set()).add(k)
    multi = {i for i, ls in loops_of.items() if len(ls) > 1 and P[i].op not in LEAVES}
    inner = {a for j in multi for a in P[j].args if a in multi and loops_of[a] <= loops_of[j]}
    return {i: min(loops_of[i]) for i in multi if P[i].op in TRANSCENDENTAL or i not in inner}


def _row_stages(P: list[Prim], needed: set[int], nloops: int) -> list[tuple[int, ...]]:
    """Row values (one per row; not reductions, not float constants) of `needed` by stage: stage k holds
    those computed just before loop k (all their reductions are done: level <= k), stage nloops those
    after the last loop."""
    done: set[int] = set()
    stages = []
    for k in range(nloops + 1):
        st = tuple(i for i in sorted(needed)
                   if i not in done and not P[i].vec and P[i].op not in REDUCE and P[i].op != "const"
                   and P[i].lvl <= k)
        done.update(st)
        stages.append(st)
    return stages
