"""Lowering: fusion-dialect FX graph -> a kernel plan (kernel IR + call spec per fused group), and the
plan bound to built kernels -> a GraphModule calling them and ATen.

    plan = plan_kernels(gm, devices=("cpu",), hw=hw)     # schedule -> KernelIR + KernelSpec per group
    modules = backend.build(plan.irs, plan.specs, config)  # fusion.backends: render, compile, load
    res = bind_kernels(plan, modules)
    print(res.gm.code)      # softmax_0 = self.softmax_0(mul);  bmm_1 = torch.ops.aten.bmm.default(...)
    res.kernels             # [KernelInfo(name="softmax_0", nodes=[...], source_path=..., ...)]

Scheduling is in `fusion.lower.schedule`, the kernel IR in `fusion.lower.kernel_ir`, the call specs in
`fusion.lower.specs`. Nothing here knows a backend: `fusion.backends` renders and builds the plan,
`fusion.pipeline` runs prepare -> lower -> build as named passes.
"""
from __future__ import annotations

import heapq
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from fusion.dialect.values import hint, tval
from fusion.lower import kernel_ir as P
from fusion.lower import schedule as S
from fusion.lower.specs import KernelSpec, kernel_spec

aten = torch.ops.aten


class CodegenError(RuntimeError):
    """Compilation or loading of generated kernels failed (message names the stage and kernels)."""

    def __init__(self, stage: str, kernels: list[str], detail: str):
        self.stage, self.kernels = stage, kernels
        super().__init__(f"codegen failed at {stage} for kernel(s) {', '.join(kernels)}: {detail}")


@dataclass
class KernelInfo:
    name: str
    nodes: list[str]
    source_path: str
    bytes_read: int
    bytes_written: int
    flops: int
    transcendentals: int
    kind: str = "pointwise"                 # "row_reduction" | "pointwise"
    domain: list = field(default_factory=list)
    scratch_rows: int = 0


@dataclass
class LowerResult:
    gm: fx.GraphModule
    kernels: list[KernelInfo]


# ----------------------------------------------------------------------------------- naming
def _kernel_base_name(g: S.Group) -> str:
    ops = []
    for m in g.members:
        if m.target in S.ROW_FUSED:
            ops.append(S.ROW_FUSED[m.target])
        elif m.target in S.REDUCTIONS:
            ops.append(S.REDUCTIONS[m.target])
        elif m.target in S.POINTWISE:
            ops.append(S.POINTWISE[m.target])
    s = set(ops)
    pattern = None
    if {"amax", "exp", "sum", "div"} <= s or {"amax", "exp", "sum", "mul"} <= s and "log" not in s:
        pattern = "softmax"
    elif {"amax", "exp", "sum", "log"} <= s:
        pattern = "log_softmax"
    elif "var" in s or ({"mean", "sub"} <= s and ({"rsqrt", "sqrt"} & s)):
        pattern = "layer_norm"
    elif "mean" in s and ({"rsqrt", "sqrt"} & s):
        pattern = "rms_norm"
    if pattern is None and "sigmoid" in s and "mul" in s:
        ops = ["silu" if o == "sigmoid" else o for o in ops]
        if ops.count("mul") >= 2:
            ops.remove("mul")                 # x * sigmoid(x) is part of silu
        else:
            ops = [o for o in ops if o != "mul"]
    toks: list[str] = []
    for o in ops:
        if pattern is not None and o in ("amax", "exp", "sum", "div", "mean", "sub", "pow", "rsqrt",
                                         "sqrt", "var", "log", "mul", "add"):
            if pattern not in toks and not (toks and toks[-1] == pattern):
                toks.append(pattern)
            continue
        if o not in toks:
            toks.append(o)
    if pattern is not None and pattern not in toks:
        toks.append(pattern)
    return "_".join(toks[:3]) or "kernel"


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= hint(d)
    return n


def _stats(ir: P.KernelIR) -> tuple[int, int, int, int]:
    rows_n = _numel(ir.D)
    rows = _numel(ir.D[:-1])
    br = 0
    for inp in ir.inputs:
        v = tval(inp.node)
        br += _numel(v.shape) * v.element_size()
    bw = 0
    for o in ir.outputs:
        v = tval(o.node)
        bw += _numel(v.shape) * v.element_size()
    flops = tr = 0
    for p in ir.prims:
        if p.op in ("load", "const", "constb", "N"):
            continue
        cnt = rows_n if p.vec or p.op in P.REDUCE else rows
        flops += cnt
        if p.op in P.TRANSCENDENTAL:
            tr += cnt
    return br, bw, flops, tr


# ----------------------------------------------------------------------------------- lowering
@dataclass
class KernelPlan:
    """What lowering decided: the graph the kernels replace nodes of, and each kernel's IR and call spec."""

    gm: fx.GraphModule
    irs: list[P.KernelIR] = field(default_factory=list)
    specs: list[KernelSpec] = field(default_factory=list)


def plan_kernels(gm: fx.GraphModule, devices: tuple = ("cpu",), hw: Any = None) -> KernelPlan:
    """Schedule gm into fusion groups (tensors on `devices`; groups priced by `hw` where given) and build
    the kernel IR and call spec of each group that can become a kernel."""
    groups = [g for g in S.schedule(gm, devices) if S.worth_a_kernel(g, hw)]
    built = kernel_irs(groups)
    return KernelPlan(gm, [ir for ir, _ in built], [spec for _, spec in built])


def bind_kernels(plan: KernelPlan, modules: dict[str, torch.nn.Module]) -> LowerResult:
    """The plan's graph with each group replaced by a call of its built kernel module (name -> module, each
    with `source_path` and `kind`), and the report figures of every kernel."""
    infos = []
    for ir in plan.irs:
        mod = modules[ir.name]
        br, bw, fl, tr = _stats(ir)
        infos.append(KernelInfo(ir.name, [m.name for m in ir.members], mod.source_path, br, bw, fl, tr,
                                kind=mod.kind, domain=[hint(d) for d in ir.D],
                                scratch_rows=_scratch_rows(ir, mod)))
    return LowerResult(_rebuild(plan.gm, plan.irs, modules), infos)


def _scratch_rows(ir: P.KernelIR, mod: torch.nn.Module) -> int:
    """Per-thread scratch rows a built kernel holds: its plan's for a C++ kernel (its row loops keep them),
    none for a Triton kernel (its loops recompute every vec value)."""
    return ir.plan.n_scratch if str(mod.source_path).endswith(".cpp") else 0


def kernel_irs(groups: list) -> list[tuple[P.KernelIR, KernelSpec]]:
    """Kernel IR and runtime spec of each scheduled group that can become a kernel, named in order."""
    out: list[tuple[P.KernelIR, KernelSpec]] = []
    for g in groups:
        try:
            ir = P.build(g, f"{_kernel_base_name(g)}_{len(out)}")
        except (P.UnsupportedError, KeyError):
            continue
        spec = kernel_spec(ir) if ir.outputs else None
        if spec is not None:
            out.append((ir, spec))
    return out


def _rebuild(gm: fx.GraphModule, irs: list[P.KernelIR], modules: dict) -> fx.GraphModule:
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    owner: dict[fx.Node, int] = {}
    for gi, ir in enumerate(irs):
        for m in ir.members:
            owner[m] = gi
    # condensed DAG: items are ("n", node) or ("g", group index); Kahn's algorithm by original order
    def item(n):
        return ("g", owner[n]) if n in owner else ("n", n)

    deps: dict = {}
    key: dict = {}
    for n in nodes:
        it = item(n)
        key[it] = min(key.get(it, index[n]), index[n])
        ds = deps.setdefault(it, set())
        for a in n.all_input_nodes:
            ia = item(a)
            if ia != it:
                ds.add(ia)
    users: dict = {it: [] for it in deps}
    indeg = {it: len(ds) for it, ds in deps.items()}
    for it, ds in deps.items():
        for d in ds:
            users[d].append(it)
    heap = [(key[it], i, it) for i, it in enumerate(deps) if indeg[it] == 0]
    heapq.heapify(heap)
    tie = len(deps)
    order = []
    while heap:
        _, _, it = heapq.heappop(heap)
        order.append(it)
        for u in users[it]:
            indeg[u] -= 1
            if indeg[u] == 0:
                tie += 1
                heapq.heappush(heap, (key[u], tie, u))
    if len(order) != len(deps):
        raise CodegenError("schedule", [ir.name for ir in irs], "fused groups form a cycle")

    graph = fx.Graph()
    graph._codegen = gm.graph._codegen
    env: dict[fx.Node, fx.Node] = {}
    for it in order:
        if it[0] == "n":
            n = it[1]
            env[n] = graph.node_copy(n, lambda a: env[a])
            continue
        ir = irs[it[1]]
        args = tuple(env[i.node] for i in ir.inputs)
        k = graph.create_node("call_module", ir.name, args, name=ir.name)
        vals = [o.node.meta.get("val") for o in ir.outputs]
        if len(ir.outputs) == 1:
            k.meta["val"] = tval(ir.outputs[0].node)
            env[ir.outputs[0].node] = k
        else:
            k.meta["val"] = tuple(vals)
            for j, o in enumerate(ir.outputs):
                gnode = graph.create_node("call_function", operator.getitem, (k, j), name=o.node.name)
                gnode.meta["val"] = tval(o.node)
                env[o.node] = gnode
    root: dict[str, Any] = dict(modules)
    for n in graph.nodes:
        if n.op == "get_attr":
            obj = gm
            for part in n.target.split("."):
                obj = getattr(obj, part)
            root[n.target] = obj
        elif n.op == "call_module" and n.target not in root:
            root[n.target] = gm.get_submodule(n.target)
    new_gm = fx.GraphModule(root, graph, class_name=type(gm).__name__)
    new_gm.meta.update(getattr(gm, "meta", {}))
    return new_gm
