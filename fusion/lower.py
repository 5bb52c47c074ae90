"""Lowering: fusion-dialect FX graph -> GraphModule calling generated C++ kernels + ATen.

    res = lower_to_kernels(gm, config)
    print(res.gm.code)      # softmax_0 = self.softmax_0(mul);  bmm_1 = torch.ops.aten.bmm.default(...)
    res.kernels             # [KernelInfo(name="softmax_0", nodes=[...], source_path=..., ...)]

Scheduling is in `fusion.schedule`, the kernel IR in `fusion.codegen.prims`, C++ rendering in
`fusion.codegen.cpp`, compilation in `fusion.kernel_cache`, the call wrappers in `fusion.runtime`.
"""
from __future__ import annotations

import heapq
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from costmodel.graph_walk import reaches
from fusion import kernel_cache, progress, runtime
from fusion import schedule as S
from fusion.codegen import cpp
from fusion.codegen import prims as P
from fusion.config import Config

aten = torch.ops.aten

try:
    from costmodel.hardware import HardwareProfile
except Exception:  # pragma: no cover
    HardwareProfile = Any  # type: ignore


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
        n *= S.hint(d)
    return n


def _domain_sources(ir: P.KernelIR) -> list | None:
    R = len(ir.D)
    src = []
    for d in range(R):
        found = None
        for k, inp in enumerate(ir.inputs):
            shape = list(S.tval(inp.node).shape)
            width = R if inp.mode == "full" else R - 1
            if d >= width:
                continue
            i = d - (width - len(shape))
            if i >= 0 and not S.is_one(shape[i]) and S.same_dim(shape[i], ir.D[d]):
                found = (k, i)
                break
        if found is None:
            if isinstance(ir.D[d], torch.SymInt):
                return None
            found = (-1, int(ir.D[d]))
        src.append(found)
    return src


def _input_spec(ir: P.KernelIR, inp: P.Input) -> runtime.InputSpec:
    R = len(ir.D)
    rank = inp.rank
    width = R if inp.mode == "full" else R - 1
    dmap = []
    for d in range(R - 1):
        i = d - (width - rank)
        dmap.append(i if 0 <= i < rank and d < width else None)
    last = rank - 1 if inp.mode == "full" and rank >= 1 else None
    full_shape = inp.mode == "full" and rank == R and S.same_shape(list(S.tval(inp.node).shape), ir.D)
    return runtime.InputSpec(dmap=dmap, last=last, vec=inp.vec, full_shape=full_shape)


def _stats(ir: P.KernelIR) -> tuple[int, int, int, int]:
    rows_n = _numel(ir.D)
    rows = _numel(ir.D[:-1])
    br = 0
    for inp in ir.inputs:
        v = S.tval(inp.node)
        br += _numel(v.shape) * v.element_size()
    bw = 0
    for o in ir.outputs:
        v = S.tval(o.node)
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


# ----------------------------------------------------------------------------------- pre-pass
#: ATen ops whose result may share storage with their first argument
_ALIASING = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.alias.default, aten.t.default,
    aten.transpose.int, aten.permute.default, aten.expand.default, aten.slice.Tensor, aten.select.int,
    aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.as_strided.default,
    aten.diagonal.default, aten.unfold.default, aten.chunk.default, aten.narrow.default,
    aten.view_as_real.default, aten.view_as_complex.default, aten.detach.default, operator.getitem,
}


def _aliases_output_or_input(n: fx.Node) -> bool:
    """True if n (through view-like users) is a graph output, or n is (through views) a graph input."""
    return reaches(n, lambda w: w.op == "output", lambda w: w.op != "call_function" or w.target in _ALIASING)


def _from_input(n: Any) -> bool:
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in _ALIASING and n.args:
        n = n.args[0]
    return not isinstance(n, fx.Node) or n.op != "call_function"


def _prepare(gm: fx.GraphModule) -> fx.GraphModule:
    """Graph clean-ups that only pay off with kernels (on a copy; gm itself stays as it was):

    - a `clone` of a value that is already contiguous (dropout in eval, `.contiguous()` no-ops) is
      dropped, unless the clone is (through views) a graph output or its input comes from a graph input
      (aliasing would then be observable);
    - `addmm(b, x, w)` whose result feeds (through one view) only fusable ops becomes
      `mm(x, w)` + `b` after the view, so the bias add joins the consumer's kernel instead of ATen
      copying the bias into the output before the GEMM."""
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    changed = False
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        if n.target is aten.clone.default and len(n.args) == 1 and isinstance(n.args[0], fx.Node):
            x, v = n.args[0], S.tval(n)
            xv = S.tval(n.args[0])
            mf = n.kwargs.get("memory_format")
            if (xv is None or v is None or set(n.kwargs) - {"memory_format"}
                    or mf not in (None, torch.contiguous_format, torch.preserve_format)
                    or not xv.is_contiguous() or xv.dtype != v.dtype or _from_input(x)
                    or _aliases_output_or_input(n)):
                continue
            n.replace_all_uses_with(x)
            graph.erase_node(n)
            changed = True
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target in (aten._unsafe_view.default, aten.view.default):
            changed |= _reshape_for_matmul(graph, n)
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target is aten.addmm.default:
            changed |= _split_addmm(graph, n)
        elif n.op == "call_function" and n.target is aten.cat.default:
            changed |= _rotate_half(graph, n)
    if not changed:
        return gm
    graph.eliminate_dead_code()
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta.update(getattr(gm, "meta", {}))
    return new


def _reshape_for_matmul(graph: fx.Graph, n: fx.Node) -> bool:
    """view(clone(x, contiguous), shape) read only by bmm/mm -> reshape(x, shape): no copy when the
    strides allow a view (K^T of a contiguous K: BLAS reads it transposed), a copy otherwise."""
    c = n.args[0]
    if not (isinstance(c, fx.Node) and c.op == "call_function" and c.target is aten.clone.default
            and len(c.users) == 1 and len(c.args) == 1
            and c.kwargs.get("memory_format") in (None, torch.contiguous_format)):
        return False
    if not n.users or any(u.op != "call_function" or u.target not in (aten.bmm.default, aten.mm.default)
                          for u in n.users):
        return False
    with graph.inserting_before(n):
        r = graph.create_node("call_function", aten.reshape.default, (c.args[0], n.args[1]), name=f"{n.name}_r")
        r.meta = dict(n.meta)
    n.replace_all_uses_with(r)
    graph.erase_node(n)
    graph.erase_node(c)
    return True


def _slice_of(n: Any, rank: int) -> tuple | None:
    """(x, start, end) of a step-1 slice over the last dim, else None."""
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target is aten.slice.Tensor):
        return None
    a = list(n.args) + [None] * (5 - len(n.args))
    x, dim, start, end, step = a[:5]
    dim = 0 if dim is None else dim
    if dim not in (-1, rank - 1) or step not in (None, 1) or n.kwargs:
        return None
    return x, start or 0, end


def _rotate_half(graph: fx.Graph, n: fx.Node) -> bool:
    """cat([-x[..., h:], x[..., :h]], -1) with N = 2h static -> S.rotate_half(x) (RoPE)."""
    v = S.tval(n)
    if v is None or len(n.args) < 2 or not isinstance(n.args[0], (list, tuple)) or len(n.args[0]) != 2:
        return False
    r = v.dim()
    if n.args[1] not in (-1, r - 1) or n.kwargs:
        return False
    a, b = n.args[0]
    if not (isinstance(a, fx.Node) and a.target is aten.neg.default):
        return False
    sa, sb = _slice_of(a.args[0], r), _slice_of(b, r)
    if sa is None or sb is None or sa[0] is not sb[0]:
        return False
    x = sa[0]
    xv = S.tval(x)
    if xv is None or xv.dim() != r or xv.dtype != v.dtype or list(xv.shape) != list(v.shape):
        return False
    N = xv.shape[-1]
    if isinstance(N, torch.SymInt) or N % 2 or N < 2:
        return False
    h = N // 2
    if sa[1] != h or sa[2] is None or sa[2] < N or sb[1] != 0 or sb[2] != h:
        return False
    with graph.inserting_before(n):
        rot = graph.create_node("call_function", S.rotate_half, (x,), name=f"{n.name}_rotate_half")
        rot.meta = dict(n.meta)
    n.replace_all_uses_with(rot)
    graph.erase_node(n)
    return True


def _split_addmm(graph: fx.Graph, n: fx.Node) -> bool:
    b, x, w = n.args[:3]
    if n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1 or len(n.args) > 3:
        return False
    bv, v = S.tval(b), S.tval(n)
    if bv is None or v is None or bv.dim() != 1 or v.dtype not in S.FLOAT_IN or bv.dtype != v.dtype:
        return False
    if len(n.users) != 1:
        return False
    (view,) = n.users
    if view.op != "call_function" or view.target not in (aten.view.default, aten._unsafe_view.default,
                                                          aten.reshape.default):
        return False
    vv = S.tval(view)
    if vv is None or not view.users or list(vv.shape[-1:]) != list(v.shape[-1:]):
        return False
    if any(S.classify(u) not in ("pw", "red", "fused") for u in view.users):
        return False
    with graph.inserting_before(n):
        mm = graph.create_node("call_function", aten.mm.default, (x, w), name=f"{n.name}_mm")
        mm.meta = dict(n.meta)
    with graph.inserting_after(view):
        add = graph.create_node("call_function", aten.add.Tensor, (view, b), name=f"{n.name}_bias")
        add.meta = dict(view.meta)
    view.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
    view.args = (mm,) + tuple(view.args[1:])
    graph.erase_node(n)
    return True


# ----------------------------------------------------------------------------------- lowering
def _on_cuda(gm: fx.GraphModule) -> bool:
    """The device of the inputs picks the backend: any CUDA placeholder means Triton."""
    return any(isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].device.type == "cuda"
               for n in gm.graph.nodes if n.op == "placeholder")


def lower_to_kernels(gm: fx.GraphModule, config: Config | None = None,
                     hw: HardwareProfile | None = None) -> LowerResult:
    config = config or Config()
    if config.codegen == "aten":
        return LowerResult(gm, [])
    if config.codegen == "triton" or (config.codegen == "auto" and _on_cuda(gm)):
        import fusion.codegen.triton_attention  # noqa: F401  (fusion.attention -> Triton on CUDA)
        from fusion.codegen.triton_lower import lower_to_triton

        return lower_to_triton(gm, config, hw)
    original = gm
    gm = _prepare(gm)
    # bf16 buffers in generated CPU kernels only in the approximate "bf16" mode (exact mode never makes one)
    devices = ("cpu", S.CPU_BF16) if "bf16" in config.approximate else ("cpu",)
    groups = [g for g in S.schedule(gm, devices) if S.worth_a_kernel(g, hw)]
    built = kernel_irs(groups)
    irs = [ir for ir, _ in built]
    specs = [spec for _, spec in built]
    if not irs:
        return LowerResult(original, [])

    try:
        source = cpp.render_module(irs)
    except Exception as e:  # a bug in rendering: name the kernels
        raise CodegenError("render", [ir.name for ir in irs], repr(e)) from e
    progress.stage(f"lower: compile {len(irs)} kernels")
    try:
        cpp_path, so_path = kernel_cache.build(source, config.cache_dir)
        lib = kernel_cache.load(so_path)
    except Exception as e:
        raise CodegenError("compile", [ir.name for ir in irs], str(e)) from e

    modules: dict[str, runtime.FusedKernel] = {}
    infos: list[KernelInfo] = []
    for ir, spec in zip(irs, specs):
        try:
            fn = runtime.bind(lib, ir.name, len(ir.inputs) + len(ir.outputs))
        except AttributeError as e:
            raise CodegenError("load", [ir.name], str(e)) from e
        kind = "row_reduction" if ir.has_reduction else "pointwise"
        desc = " -> ".join(m.name for m in ir.members[:6]) + (" ..." if len(ir.members) > 6 else "")
        modules[ir.name] = runtime.FusedKernel(ir.name, fn, spec, [m.name for m in ir.members], kind,
                                               cpp_path, config.num_threads, desc)
        modules[ir.name].so_path = so_path
        br, bw, fl, tr = _stats(ir)
        infos.append(KernelInfo(ir.name, [m.name for m in ir.members], cpp_path, br, bw, fl, tr,
                                kind=kind, domain=[S.hint(d) for d in ir.D],
                                scratch_rows=getattr(ir, "n_scratch", 0)))
    new_gm = _rebuild(gm, irs, modules)
    return LowerResult(new_gm, infos)


def kernel_spec(ir: P.KernelIR) -> runtime.KernelSpec | None:
    """How the runtime calls one kernel IR (None: it cannot be called; the group stays ATen).
    Shared by the C++ and Triton back ends."""
    dsrc = _domain_sources(ir)
    if dsrc is None:
        return None
    ins = [_input_spec(ir, i) for i in ir.inputs]
    flatten = not ir.has_reduction and any(s.vec for s in ins) and not any(i.rot for i in ir.inputs) and all(
        s.full_shape if s.vec else all(S.is_one(d) for d in S.tval(i.node).shape)
        for s, i in zip(ins, ir.inputs)) and all(o.form == "full" for o in ir.outputs)
    outs = [(o.form, torch.bfloat16 if o.bf16 else torch.float32 if o.dtype == "f" else torch.bool)
            for o in ir.outputs]
    pointwise = not ir.has_reduction and not any(i.rot for i in ir.inputs) and all(o.form == "full" for o in ir.outputs)
    return runtime.KernelSpec(R=len(ir.D), dsrc=dsrc, inputs=ins, outputs=outs, flatten=flatten, pointwise=pointwise)


def kernel_irs(groups: list) -> list[tuple[P.KernelIR, runtime.KernelSpec]]:
    """Kernel IR and runtime spec of each scheduled group that can become a kernel, named in order."""
    out: list[tuple[P.KernelIR, runtime.KernelSpec]] = []
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
            k.meta["val"] = S.tval(ir.outputs[0].node)
            env[ir.outputs[0].node] = k
        else:
            k.meta["val"] = tuple(vals)
            for j, o in enumerate(ir.outputs):
                gnode = graph.create_node("call_function", operator.getitem, (k, j), name=o.node.name)
                gnode.meta["val"] = S.tval(o.node)
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
