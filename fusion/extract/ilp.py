"""DAG-aware extraction from a saturated e-graph: an ILP (scipy HiGHS) with a greedy fallback.

egglog's built-in `extract` is tree cost: a subterm shared by k users is paid k times, so it
happily duplicates a matmul to fuse something downstream. Here the e-graph is exported whole
(`export_egraph`, the only function touching egglog's private API), each e-node is costed once by
the caller's cost function, and the program is chosen by

    minimise   sum_j cost_j * x_j                   x_j in {0, 1}: e-node j is computed
    subject to sum_{j in r} x_j >= 1                for each root class r
               x_j <= sum_{m in c} x_m              for each e-node j and each child class c of j
               l_a - l_b >= 1 - S (1 - x_j)         for each edge j: a -> b inside a cycle (SCC of size S)

so a shared class is paid once however many e-nodes use it. Self-loop e-nodes (from x*1 = x)
are dropped before solving; level variables are only added inside non-trivial SCCs.

**Kernel boundaries** (`FusionCosts`, the default in `rewrites.rewrite`): the cost of a choice depends
on which e-nodes end up in one generated kernel, so the ILP also decides, per e-class c, whether its
value is materialised in memory (m_c), and pays memory traffic on those boundaries only:

    minimise   sum_j x_j * (alone_j if j is opaque/view, inside_j if j is fusible)
             + sum_c write_c * w_c + sum_c read_c * r_c
    subject to the constraints above, and
               m_c >= x_j         c = class of an opaque/view e-node j, or a tensor child of one
               m_c >= x_j         c a child of fusible j that cannot share j's row kernel (shape)
               m_r = 1            for each root class r;  m_c = 1 for leaves (inputs, weights)
               w_c >= m_c + x_j - 1     fusible j in c: a kernel writes c (and pays its call)
               r_c >= m_c + x_j - 1     fusible j with child c: a kernel reads c from memory

with w, r continuous in [0, 1] (at the optimum they equal the products m_c·x_j). An unmaterialised
class costs only the arithmetic of its e-node inside the consumer's kernel; a materialised one
produced by a fusible e-node pays a write, the call of the kernel that ends there, and one read by
the fusible kernels that consume it (opaque consumers pay their reads themselves). This is the
scheduler's rule (fusion/lower/schedule.py: pointwise chains, last-dim reductions and row ops fuse; GEMMs,
attention and views do not) written as constraints.
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Ref(int):
    """A tensor argument of an e-node: the id of the child e-class."""


@dataclass(frozen=True)
class ENode:
    id: int
    cls: int
    op: str
    args: tuple                  # Ref(class) for tensor children, decoded literals otherwise
    children: tuple = ()         # the child classes, in argument order (derived from args)
    literals: tuple = ()         # the non-tensor arguments, in order (derived from args)

    @staticmethod
    def make(id: int, cls: int, op: str, args: tuple) -> ENode:
        args = tuple(tuple(a) if isinstance(a, list) else a for a in args)   # Vec literals, hashable
        return ENode(id, cls, op, args, tuple(int(a) for a in args if isinstance(a, Ref)),
                     tuple(a for a in args if not isinstance(a, Ref)))


@dataclass
class EGraphExport:
    nodes: list[ENode]
    classes: dict[int, list[int]]                      # class -> e-node ids
    lets: dict[str, int]                               # let name -> class
    tables: dict[str, dict[tuple, Any]] = field(default_factory=dict)   # e.g. "shape": {(cls,): [..]}

    def shape(self, cls: int) -> list[int] | None:
        return self.tables.get("shape", {}).get((cls,))

    def dtype(self, cls: int) -> str | None:
        return self.tables.get("dtype", {}).get((cls,))

    @property
    def num_enodes(self) -> int:
        return len(self.nodes)


def export_egraph(egraph: Any, sort: str = "Tensor") -> EGraphExport:
    """Snapshot an `egglog.EGraph` (private API: `EGraph._egraph.freeze()` and `value_to_*`)."""
    raw = egraph._egraph
    frozen = raw.freeze()
    ids: dict[Any, int] = {}

    def decode(value: Any, s: str) -> Any:
        if s == sort:
            return Ref(ids.setdefault(value, len(ids)))
        if s == "i64":
            return raw.value_to_i64(value)
        if s == "f64":
            return raw.value_to_f64(value)
        if s == "String":
            return raw.value_to_string(value)
        if s == "bool":
            return raw.value_to_bool(value)
        if "Vec" in s:
            return [raw.value_to_i64(v) for v in raw.value_to_vec(value)]
        return value

    nodes: list[ENode] = []
    classes: dict[int, list[int]] = {}
    lets: dict[str, int] = {}
    tables: dict[str, dict[tuple, Any]] = {}
    for name, fn in frozen.functions.items():
        if fn.is_let_binding:
            for row in fn.rows:
                lets[name.removeprefix("$")] = int(decode(row.output, sort))
            continue
        if fn.output_sort != sort:
            table = tables.setdefault(name, {})
            for row in fn.rows:
                key = tuple(decode(v, s) for v, s in zip(row.inputs, fn.input_sorts))
                table[tuple(int(k) if isinstance(k, Ref) else k for k in key)] = decode(row.output, fn.output_sort)
            continue
        for row in fn.rows:
            if row.subsumed:
                continue
            cls = int(decode(row.output, sort))
            node = ENode.make(len(nodes), cls, name, tuple(decode(v, s) for v, s in zip(row.inputs, fn.input_sorts)))
            nodes.append(node)
            classes.setdefault(cls, []).append(node.id)
    return EGraphExport(nodes, classes, lets, tables)


@dataclass
class Extraction:
    choice: dict[int, int]      # class -> chosen e-node id (for every class the program needs)
    cost: float                 # DAG cost: each chosen e-node paid once
    method: str                 # "ilp", "ilp (time limit)", "greedy"
    seconds: float
    status: str = ""


def dag_cost(ex: EGraphExport, choice: dict[int, int], roots: Iterable[int], costs: Sequence[float]) -> float:
    """Cost of the program `choice` reaches from `roots`, each e-node once; inf if incomplete or cyclic."""
    done: set[int] = set()
    total = 0.0
    for root in roots:
        stack: list[tuple[int, bool]] = [(root, False)]
        active: set[int] = set()
        while stack:
            cls, leaving = stack.pop()
            if leaving:
                active.discard(cls)
                done.add(cls)
                continue
            if cls in done:
                continue
            if cls in active or cls not in choice:
                return float("inf")
            active.add(cls)
            node = ex.nodes[choice[cls]]
            total += costs[node.id]
            stack.append((cls, True))
            stack.extend((ch, False) for ch in node.children if ch not in done)
    return total


def _reachable(ex: EGraphExport, roots: Iterable[int]) -> list[int]:
    seen: set[int] = set()
    order: list[int] = []
    stack = list(roots)
    while stack:
        c = stack.pop()
        if c in seen:
            continue
        seen.add(c)
        order.append(c)
        for j in ex.classes.get(c, []):
            stack.extend(ch for ch in ex.nodes[j].children if ch not in seen)
    return order


def _usable(ex: EGraphExport, j: int) -> bool:
    node = ex.nodes[j]
    return node.cls not in node.children


def extract_greedy(ex: EGraphExport, roots: Sequence[int], costs: Sequence[float]) -> Extraction:
    """Bottom-up tree cost (each class its cheapest e-node given its children's best), by worklist.

    This is the classic greedy extractor; it pays a shared child once per use, so it is only the
    fallback when the ILP finds nothing in time (and the yardstick the tests compare against).
    """
    t0 = time.perf_counter()
    classes = _reachable(ex, roots)
    users: dict[int, list[int]] = {}
    work: deque[int] = deque()
    for c in classes:
        for j in ex.classes.get(c, []):
            if not _usable(ex, j):
                continue
            for ch in set(ex.nodes[j].children):
                users.setdefault(ch, []).append(j)
            if not ex.nodes[j].children:
                work.append(j)
    best: dict[int, float] = {}
    choice: dict[int, int] = {}
    while work:
        node = ex.nodes[work.popleft()]
        if any(ch not in best for ch in node.children):
            continue
        v = costs[node.id] + sum(best[ch] for ch in node.children)
        if v < best.get(node.cls, float("inf")) * (1 - 1e-12):
            best[node.cls], choice[node.cls] = v, node.id
            work.extend(users.get(node.cls, ()))
    return Extraction(choice, dag_cost(ex, choice, roots, costs), "greedy", time.perf_counter() - t0)


def _sccs(classes: list[int], succ: dict[int, set[int]]) -> dict[int, int]:
    """Tarjan (iterative): class -> SCC id, for SCCs of size > 1 only."""
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    on: set[int] = set()
    stack: list[int] = []
    out: dict[int, int] = {}
    counter = 0
    for start in classes:
        if start in index:
            continue
        work = [(start, iter(succ.get(start, ())))]
        index[start] = low[start] = counter; counter += 1
        stack.append(start); on.add(start)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter; counter += 1
                    stack.append(w); on.add(w)
                    work.append((w, iter(succ.get(w, ()))))
                    advanced = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop(); on.discard(w); comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    for w in comp:
                        out[w] = v
    return out


class _Milp:
    """A mixed-integer program being built: variables (cost, bounds, integer or not) in creation order and
    sparse rows ``lo <= sum(a * v) <= hi``; `solve` hands it to scipy's HiGHS."""

    def __init__(self) -> None:
        self.cost: list[float] = []
        self.lower: list[float] = []
        self.upper: list[float] = []
        self.integer: list[float] = []
        self.rows: list[int] = []
        self.cidx: list[int] = []
        self.vals: list[float] = []
        self.lb: list[float] = []
        self.ub: list[float] = []

    def var(self, cost: float, lo: float = 0.0, hi: float = 1.0, integer: bool = False) -> int:
        """A new variable in [lo, hi] paying `cost` per unit -> its column."""
        self.cost.append(cost); self.lower.append(lo); self.upper.append(hi)
        self.integer.append(1.0 if integer else 0.0)
        return len(self.cost) - 1

    def row(self, terms: Iterable[tuple[int, float]], lo: float, hi: float) -> None:
        """The constraint lo <= sum(a * v for v, a in terms) <= hi."""
        r = len(self.lb)
        for v, a in terms:
            self.rows.append(r); self.cidx.append(v); self.vals.append(a)
        self.lb.append(lo); self.ub.append(hi)

    def geq(self, pos: Iterable[int], neg: Iterable[int], rhs: float) -> None:
        """sum(pos) - sum(neg) >= rhs."""
        self.row([*((v, 1.0) for v in pos), *((v, -1.0) for v in neg)], rhs, np.inf)

    def solve(self, time_limit: float) -> Any:
        """scipy's `milp` result (``.x`` None when no feasible point was found within `time_limit` seconds)."""
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import coo_matrix

        a = coo_matrix((self.vals, (self.rows, self.cidx)), shape=(len(self.lb), len(self.cost))).tocsr()
        return milp(np.array(self.cost), integrality=np.array(self.integer),
                    bounds=Bounds(np.array(self.lower), np.array(self.upper)),
                    constraints=LinearConstraint(a, np.array(self.lb), np.array(self.ub)),
                    options={"time_limit": float(time_limit), "disp": False})


def extract_ilp(ex: EGraphExport, roots: Sequence[int], costs: Sequence[float], time_limit: float,
                fusion: FusionCosts | None = None) -> Extraction | None:
    """Optimal DAG extraction by MILP (None if no feasible solution was found in time); with `fusion`,
    optimal under the kernel-boundary model (materialisation variables, see the module docstring)."""
    t0 = time.perf_counter()
    classes = _reachable(ex, roots)
    cols = [j for c in classes for j in ex.classes.get(c, []) if _usable(ex, j)]
    prog = _Milp()
    node_cost = (lambda j: fusion.node_cost(j, costs)) if fusion is not None else (lambda j: costs[j])
    x = {j: prog.var(node_cost(j), integer=True) for j in cols}     # x_j: e-node j is computed
    _add_dag_rows(prog, ex, roots, classes, cols, x)
    if fusion is not None:
        _add_kernel_boundary_rows(prog, ex, roots, cols, x, fusion)
    res = prog.solve(time_limit)
    if res.x is None:
        return None
    choice = _read_choice(ex, cols, x, res.x, costs)
    method = "ilp" if res.status == 0 else "ilp (time limit)"
    return Extraction(choice, dag_cost(ex, choice, roots, costs), method, time.perf_counter() - t0, res.message)


def _add_dag_rows(prog: _Milp, ex: EGraphExport, roots: Sequence[int], classes: list[int], cols: list[int],
                  x: dict[int, int]) -> None:
    """The DAG constraints of the module docstring on the columns `x` (e-node id -> column): every root
    computed, every computed e-node's child classes computed, and level variables (added here) ordering
    the classes of each cycle so that no chosen e-node depends on itself."""
    members: dict[int, list[int]] = {c: [] for c in classes}
    succ: dict[int, set[int]] = {c: set() for c in classes}
    for j in cols:
        members[ex.nodes[j].cls].append(x[j])
        succ[ex.nodes[j].cls].update(ex.nodes[j].children)
    scc = _sccs(classes, succ)
    size: dict[int, int] = {}
    for s in scc.values():
        size[s] = size.get(s, 0) + 1
    level = {c: prog.var(0.0, 0.0, float(size[scc[c]])) for c in scc}
    for root in set(roots):                       # sum_{j in root} x_j >= 1
        prog.row([(i, 1.0) for i in members.get(root, [])], 1.0, np.inf)
    for j in cols:
        node = ex.nodes[j]
        for ch in set(node.children):             # x_j - sum_{m in ch} x_m <= 0
            prog.row([(x[j], 1.0), *((m, -1.0) for m in members.get(ch, []))], -np.inf, 0.0)
            if node.cls in scc and scc.get(ch) == scc[node.cls]:
                big = float(size[scc[node.cls]])  # l_a - l_b - S x_j >= 1 - S
                prog.row([(level[node.cls], 1.0), (level[ch], -1.0), (x[j], -big)], 1.0 - big, np.inf)


def _add_kernel_boundary_rows(prog: _Milp, ex: EGraphExport, roots: Sequence[int], cols: list[int],
                              x: dict[int, int], fc: FusionCosts) -> None:
    """The kernel-boundary model of the module docstring: per class a materialisation m_c (integer; 1 for
    roots and leaves), a write w_c and a read r_c (continuous, paying `fc.write` / `fc.read`), and the rows
    tying them to the e-node columns `x`. Variables are created in first-use order."""
    root_set = set(roots)
    mvar: dict[int, int] = {}
    wvar: dict[int, int] = {}
    rvar: dict[int, int] = {}

    def m_of(c: int) -> int:
        if c not in mvar:
            leaf = all(fc.role[m] == "leaf" for m in ex.classes.get(c, []))
            mvar[c] = prog.var(0.0, 1.0 if (leaf or c in root_set) else 0.0, integer=True)
        return mvar[c]

    for j in cols:
        node, xj = ex.nodes[j], x[j]
        role = fc.role[j]
        kids = _tensor_children(ex, fc, j)
        if role in ("view", "opaque"):
            prog.geq([m_of(node.cls)], [xj], 0.0)
            for ch in kids:
                prog.geq([m_of(ch)], [xj], 0.0)
        elif role == "fusible":
            if node.cls not in wvar:
                wvar[node.cls] = prog.var(fc.write.get(node.cls, 0.0))
            prog.geq([wvar[node.cls]], [m_of(node.cls), xj], -1.0)
            for ch in kids:
                if not fc.fuses(j, ch):
                    prog.geq([m_of(ch)], [xj], 0.0)
                if ch not in rvar:
                    rvar[ch] = prog.var(fc.read.get(ch, 0.0))
                prog.geq([rvar[ch]], [m_of(ch), xj], -1.0)


def _read_choice(ex: EGraphExport, cols: list[int], x: dict[int, int], values: Any,
                 costs: Sequence[float]) -> dict[int, int]:
    """class -> the e-node the solution computes there (`values`: the solution vector; of several
    computed e-nodes of one class, the cheapest)."""
    choice: dict[int, int] = {}
    for j in cols:
        if values[x[j]] > 0.5:
            c = ex.nodes[j].cls
            if c not in choice or costs[j] < costs[choice[c]]:
                choice[c] = j
    return choice


@dataclass
class FusionCosts:
    """Kernel-boundary-aware costs (seconds); see the module docstring for the model.

    role[j]:    "leaf" | "scalar" | "view" | "fusible" | "opaque" per e-node (logical ops: "opaque")
    inside[j]:  a fusible e-node's arithmetic inside a kernel (other roles: unused)
    write[c]:   a kernel writing class c's value (+ that kernel's call); read[c]: a kernel reading it
    fuses(j, c): whether fusible e-node j can read child class c inside its own kernel
    """
    role: list[str]
    inside: list[float]
    write: dict[int, float]
    read: dict[int, float]
    fuses: Callable[[int, int], bool]
    #: hedge: each fusible e-node also pays this fraction of its stand-alone cost, for the programs the
    #: scheduler does not fuse as modelled (a group it splits, a missing compiler, ATen fallback). It
    #: breaks the near-ties between a fused op and its decomposition fused by the scheduler (equal
    #: traffic, FLOPs within a few %) towards the fused op, which is also fast on every other path.
    unfused_weight: float = 0.05

    def node_cost(self, j: int, alone: Sequence[float]) -> float:
        if self.role[j] == "fusible":
            return self.inside[j] + self.unfused_weight * alone[j]
        return alone[j]


def _tensor_children(ex: EGraphExport, fc: FusionCosts, j: int) -> list[int]:
    """Child classes of e-node j that hold tensors in memory (not Python scalars / absent operands)."""
    return [ch for ch in set(ex.nodes[j].children) if not all(fc.role[m] == "scalar" for m in ex.classes.get(ch, []))]


def materialised(ex: EGraphExport, choice: dict[int, int], roots: Iterable[int], fc: FusionCosts,
                 reach: list[int] | None = None) -> set[int]:
    """The classes the program `choice` must keep in memory (the minimal m of the ILP for this choice);
    `reach`: the classes the program computes, when the caller has them already."""
    roots = list(roots)
    mat = set(roots)
    for c in reach if reach is not None else _reachable_chosen(ex, choice, roots):
        j = choice[c]
        role = fc.role[j]
        if role == "leaf":
            mat.add(c)
        elif role in ("view", "opaque"):
            mat.add(c)
            mat.update(_tensor_children(ex, fc, j))
        elif role == "fusible":
            mat.update(ch for ch in _tensor_children(ex, fc, j) if not fc.fuses(j, ch))
    return mat


def _reachable_chosen(ex: EGraphExport, choice: dict[int, int], roots: Iterable[int]) -> list[int]:
    seen: set[int] = set()
    order: list[int] = []
    stack = list(roots)
    while stack:
        c = stack.pop()
        if c in seen or c not in choice:
            continue
        seen.add(c)
        order.append(c)
        stack.extend(ch for ch in ex.nodes[choice[c]].children if ch not in seen)
    return order


def kernel_outputs(ex: EGraphExport, choice: dict[int, int], roots: Iterable[int], fc: FusionCosts) -> int:
    """How many values of the program `choice` generated kernels write (about the number of kernels)."""
    roots = list(roots)
    reach = _reachable_chosen(ex, choice, roots)
    mat = materialised(ex, choice, roots, fc, reach)
    return sum(1 for c in reach if c in mat and fc.role[choice[c]] == "fusible")


def fused_cost(ex: EGraphExport, choice: dict[int, int], roots: Iterable[int], alone: Sequence[float],
               fc: FusionCosts) -> float:
    """Predicted seconds of the program `choice` under the kernel-boundary model (inf if incomplete or
    cyclic): e-node costs (fusible ones inside their kernel) + writes and reads of materialised classes."""
    roots = list(roots)
    if not math.isfinite(dag_cost(ex, choice, roots, [0.0] * len(ex.nodes))):
        return float("inf")
    reach = _reachable_chosen(ex, choice, roots)
    mat = materialised(ex, choice, roots, fc, reach)
    total = sum(fc.node_cost(choice[c], alone) for c in reach)
    read: set[int] = set()
    for c in reach:
        j = choice[c]
        if fc.role[j] == "fusible":
            if c in mat:
                total += fc.write.get(c, 0.0)
            read.update(ch for ch in _tensor_children(ex, fc, j) if ch in mat)
    return total + sum(fc.read.get(c, 0.0) for c in read)


def extract(ex: EGraphExport, roots: Sequence[int], cost_of: Callable[[ENode], float], time_limit: float,
            fusion: FusionCosts | None = None) -> Extraction:
    """The cheapest program found: ILP within `time_limit`, else (or if worse) the greedy one.

    With `fusion`, costs are those of the kernel-boundary model (`fused_cost`) and the ILP decides
    materialisation too; the greedy tree-cost program and the plain DAG ILP's program are candidates
    as well (the cheapest under the model wins), so a solver failure or time-out still gives a program."""
    costs = [cost_of(n) for n in ex.nodes]
    greedy = extract_greedy(ex, roots, costs)
    if fusion is not None:
        return _extract_fused(ex, roots, costs, time_limit, fusion, greedy)
    try:
        ilp = extract_ilp(ex, roots, costs, time_limit)
    except Exception as e:  # noqa: BLE001 - any solver failure falls back to greedy
        greedy.status = f"ilp failed: {e}"
        return greedy
    if ilp is None or ilp.cost > greedy.cost * (1 + 1e-9):  # (float sums differ in the last bits)
        greedy.status = "ilp found nothing better"
        return greedy
    return ilp


def _extract_fused(ex: EGraphExport, roots: Sequence[int], costs: list[float], time_limit: float,
                   fc: FusionCosts, greedy: Extraction) -> Extraction:
    t0 = time.perf_counter()
    greedy.cost = fused_cost(ex, greedy.choice, roots, costs, fc)
    best, notes = greedy, []
    try:
        ilp = extract_ilp(ex, roots, costs, time_limit, fusion=fc)
    except Exception as e:  # noqa: BLE001 - any solver failure falls back
        ilp, notes = None, [f"ilp failed: {e}"]
    if ilp is not None:
        ilp.cost = fused_cost(ex, ilp.choice, roots, costs, fc)
        if ilp.cost <= best.cost * (1 + 1e-9):
            best = ilp
        else:
            notes.append("ilp found nothing better")
    elif not notes:
        notes.append("ilp found no solution in time")
    best.seconds = time.perf_counter() - t0
    best.status = "; ".join([best.status, *notes]).strip("; ")
    return best
