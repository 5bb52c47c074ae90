"""Memory layout of convolution nets: channels-last where it measures faster at the graph's own shapes.

oneDNN's fp32 convolutions run NHWC (channels-last) data on other code paths than NCHW data, and which is
faster depends on the CPU and the shapes: on a Zen 4 a ResNet-18 at batch 8 runs ~9 % faster end to end
with channels-last weights (its 7x7 stem most of all), while at some deep 3x3 shapes NCHW wins. So each
2-D convolution and pool of an inference graph is timed both ways on fresh operands of its own shapes (the
tuning cache of this CPU: fusion/costmodel/tuning.py), as is each copy the channels-last program needs at its
borders, and the graph goes channels-last when that sum measured below MEASURED_GAIN of the NCHW sum (one
layout for the graph: a layout change between two convolutions costs a transposing copy). Without a measurement (Config(tune=False), the budget
spent, symbolic sizes) the graph stays as it was. Channels-last means:

    convolution(x, w, ...)   ->  convolution(x, contiguous(w, memory_format=channels_last), ...)
    relu(y * s + b)          ->  permute(relu(permute(y, NHWC) * s' + b'), NCHW)     (pointwise on 4-D data)

The weight's conversion is a node of the program (a no-op once the weight is channels-last) and the
caller converts the parameter itself in place once (`to_channels_last_`: same values and shape, other
strides; the NCHW storage is freed — seed 000: never a second copy), so eager use of the module still works.
ATen's convolution with a channels-last weight returns channels-last data. The pointwise ops between
convolutions (batch norm as normalised, ReLU, residual adds) are wrapped in permutes (views), so the
generated kernels read and write their operands contiguously in NHWC order instead of copying each one to
NCHW; a view the captured graph took of NCHW data reads a contiguous copy (`contiguous` first), and the
program's outputs are returned contiguous, as eager returns them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

from fusion.dialect.values import tval

aten = torch.ops.aten
CL = torch.channels_last
TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]
#: the channels-last sum of the graph's convolution times must be below this fraction of the NCHW sum
MEASURED_GAIN = 0.97
_VIEWS = (aten.view.default, aten._unsafe_view.default)


def layout_times(n: fx.Node, cache_dir: str | None, budget: Any, hw: Any = None) -> dict[str, float] | None:
    """{"nchw": s, "channels_last": s} of one layout-sensitive node (a 2-D convolution, a 2-D max or average
    pool) at its shapes, measured on fresh operands or read from the tuning cache; None (no budget left).
    A graph input arrives NCHW: its channels-last candidate converts it (inside ATen) as the program would."""
    from fusion.costmodel import tuning

    x = n.args[0]
    xs, os_ = tuple(tval(x).shape), tuple(_first_val(n).shape)
    from_input = isinstance(x, fx.Node) and x.op == "placeholder"
    batch = xs[0]
    while batch > 1 and 4 * (_numel(xs) + _numel(os_)) * batch // xs[0] > tuning.MAX_MEASURE_BYTES:
        batch //= 2                              # a proxy with fewer images: the time per image is the same
    conv = n.target is aten.convolution.default
    ws = tuple(tval(n.args[1]).shape) if conv else ()
    consts = [a for a in n.args[1:] if not isinstance(a, fx.Node)]
    key = (f"{_name(n)} fp32 x{list(xs)} w{list(ws)} bias={int(conv and n.args[2] is not None)} {consts} "
           f"from_input={int(from_input)}")

    def make() -> dict[str, Any]:
        xt = torch.randn(batch, *xs[1:])
        xc = xt if from_input else xt.contiguous(memory_format=CL)
        if not conv:
            return {"nchw": lambda: n.target(xt, *n.args[1:]), "channels_last": lambda: n.target(xc, *n.args[1:])}
        wt = torch.randn(ws)
        wc, bt = wt.contiguous(memory_format=CL), (torch.randn(ws[0]) if n.args[2] is not None else None)
        rest = n.args[3:]
        return {"nchw": lambda: n.target(xt, wt, bt, *rest), "channels_last": lambda: n.target(xc, wc, bt, *rest)}

    rate = (getattr(hw, "gemm_flops", None) or {}).get("float32") or 1e11
    work = 2.0 * _numel(os_) * batch / xs[0] * (_numel(ws[1:]) if conv else 9)
    cost = 2 * (tuning.ROUNDS + 1) * (work / rate + 4 * _numel(xs) * batch / xs[0] / 1e10 + 2e-5)
    return tuning.fastest("layout", key, make, cache_dir, budget, cost, scale=xs[0] / batch)


def channels_last(gm: fx.GraphModule, cache_dir: str | None, budget: Any, hw: Any = None) -> tuple[fx.GraphModule, dict]:
    """The graph in channels-last layout when its convolutions and pools, plus the copies that convert
    data at the layout's borders (graph inputs read channels-last, outputs returned NCHW), measured faster
    so than the NCHW graph; (gm, info)."""
    sensitive = [n for n in gm.graph.nodes if _eligible(n) or _pool(n)]
    convs = [n for n in sensitive if n.target is aten.convolution.default]
    if not convs or any(n.op == "get_attr" or n.op == "call_module" for n in gm.graph.nodes):
        return gm, {}
    times = [layout_times(n, cache_dir, budget, hw) for n in sensitive]
    if any(t is None for t in times):
        return gm, {"layout": "nchw (not measured)"}
    out = fx.GraphModule(gm, _copy(gm.graph))
    markers = _convert_weights(out.graph, {n.name for n in convs})
    _propagate(out)
    wrapped = _wrap_pointwise(out.graph)
    _contiguous_outputs(out.graph)
    out.graph.eliminate_dead_code()     # the NCHW views of values only wrapped ops read
    _propagate(out)
    borders = [conversion_time(n, cache_dir, budget) for n in out.graph.nodes
               if n.target is aten.contiguous.default and n not in markers]
    if any(t is None for t in borders):
        return gm, {"layout": "nchw (not measured)"}
    nchw = sum(t["nchw"] for t in times)
    cl = sum(t["channels_last"] for t in times) + sum(borders)
    info = {"layout": "channels_last" if cl < MEASURED_GAIN * nchw else "nchw",
            "measured_ms": {"nchw": round(nchw * 1e3, 3), "channels_last": round(cl * 1e3, 3)},
            "ops": len(sensitive), "conversions": len(borders)}
    if info["layout"] == "nchw":
        return gm, info
    info["pointwise_nhwc"] = wrapped
    out.graph.lint()
    out.recompile()
    return out, info


def conversion_time(n: fx.Node, cache_dir: str | None, budget: Any) -> float | None:
    """Seconds of one layout-converting copy (`contiguous` of a 4-D value to channels-last or back to NCHW)
    at its shape, measured or from the tuning cache; None without a budget."""
    from fusion.costmodel import tuning

    v = tval(n.args[0])
    to_cl = n.kwargs.get("memory_format") is CL
    shape = tuple(v.shape)
    key = f"convert fp32 {list(shape)} to={'channels_last' if to_cl else 'nchw'}"

    def make() -> dict[str, Any]:
        x = torch.randn(shape) if to_cl else torch.randn(shape).contiguous(memory_format=CL)
        return {"copy": (lambda: x.contiguous(memory_format=CL)) if to_cl else x.contiguous}

    guess = 8 * _numel(shape) / 5e9            # read + write at ~5 GB/s, a transposing copy here
    if 8 * _numel(shape) > tuning.MAX_MEASURE_BYTES:
        return 2 * guess                       # beyond the measuring cap (the guess, doubled)
    t = tuning.fastest("layout", key, make, cache_dir, budget, 2 * (tuning.ROUNDS + 1) * (guess + 2e-5))
    return None if t is None else t["copy"]


def channels_last_weights(gm: fx.GraphModule) -> list[str]:
    """The placeholders the program reads channels-last (the caller converts them in place)."""
    return [n.args[0].name for n in gm.graph.nodes
            if n.op == "call_function" and n.target is aten.contiguous.default
            and n.kwargs.get("memory_format") is CL and isinstance(n.args[0], fx.Node)
            and n.args[0].op == "placeholder"
            and all(u.target is aten.convolution.default and u.args[1] is n for u in n.users)]


def to_channels_last_(tensors: list[torch.Tensor]) -> int:
    """Each 4-D tensor channels-last in place (`.data` rebound: same values and shape; the old storage is
    freed when nothing else holds it); how many changed."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    changed = 0
    with torch.no_grad(), unset_fake_temporarily():   # inside torch.compile a fake mode is active
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.dim() == 4 and t.layout == torch.strided \
                    and not t.is_contiguous(memory_format=CL):
                t.data = t.data.contiguous(memory_format=CL)
                changed += 1
    return changed


def _eligible(n: fx.Node) -> bool:
    if n.op != "call_function" or n.target is not aten.convolution.default or len(n.args) < 9 or n.args[6]:
        return False
    x, w = n.args[0], n.args[1]
    xv, wv, ov = tval(x), tval(w), tval(n)
    return (isinstance(w, fx.Node) and w.op == "placeholder" and wv is not None and xv is not None
            and ov is not None and wv.dim() == 4 and xv.dim() == 4 and wv.dtype == torch.float32
            and xv.dtype == torch.float32 and wv.device.type == "cpu"
            and all(isinstance(d, int) for d in (*xv.shape, *wv.shape, *ov.shape)))


#: 2-D pooling, whose ATen CPU kernels are several times faster on channels-last data
POOLS = (aten.max_pool2d_with_indices.default, aten.avg_pool2d.default)


def _pool(n: fx.Node) -> bool:
    if n.op != "call_function" or n.target not in POOLS or not isinstance(n.args[0], fx.Node):
        return False
    xv = tval(n.args[0])
    return (xv is not None and xv.dim() == 4 and xv.dtype == torch.float32 and xv.device.type == "cpu"
            and all(isinstance(d, int) for d in xv.shape))


def _name(n: fx.Node) -> str:
    return getattr(n.target, "__name__", str(n.target))


def _first_val(n: fx.Node) -> Any:
    """The first output's value of a node returning a tuple (max_pool2d_with_indices: values, indices)."""
    v = n.meta.get("val")
    return v[0] if isinstance(v, (tuple, list)) else v


def _numel(shape: Any) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def _copy(graph: fx.Graph) -> fx.Graph:
    import copy

    g = fx.Graph()
    g._codegen = copy.deepcopy(graph._codegen)
    g.output(g.graph_copy(graph, {}))
    return g


def _convert_weights(graph: fx.Graph, conv_names: set[str]) -> set[fx.Node]:
    """Each named convolution reads its weight through one `contiguous(w, channels_last)`; those nodes."""
    first = next(n for n in graph.nodes if n.op != "placeholder")
    made: dict[fx.Node, fx.Node] = {}
    for n in list(graph.nodes):
        if n.name not in conv_names:
            continue
        w = n.args[1]
        if w not in made:
            with graph.inserting_before(first):
                made[w] = graph.call_function(aten.contiguous.default, (w,), {"memory_format": CL})
        n.args = (n.args[0], made[w], *n.args[2:])
    return set(made.values())


def _propagate(gm: fx.GraphModule) -> None:
    """meta["val"] of every node again, from the placeholders' values (FakeTensors), the weights read
    channels-last. A view the captured graph took of NCHW data that the new layout cannot view reads a
    contiguous copy instead."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode(vals) or FakeTensorMode(allow_non_fake_inputs=True)
    env: dict[fx.Node, Any] = {}
    with mode:
        for n in list(gm.graph.nodes):
            if n.op == "placeholder":
                env[n] = n.meta.get("val")
                continue
            if n.op == "output":
                continue
            args, kwargs = fx.map_arg((n.args, n.kwargs), lambda a: env[a])
            try:
                v = n.target(*args, **kwargs)
            except RuntimeError:
                if n.target not in _VIEWS:
                    raise
                with gm.graph.inserting_before(n):
                    dense = gm.graph.call_function(aten.contiguous.default, (n.args[0],))
                env[dense] = dense.meta["val"] = aten.contiguous.default(args[0])
                n.args = (dense, *n.args[1:])
                v = n.target(env[dense], *args[1:], **kwargs)
            n.meta["val"] = env[n] = v


def _dense(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.is_contiguous()


def _nhwc_dense(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() == 4 and v.is_contiguous(memory_format=CL) \
        and not v.is_contiguous()


def _wrap_pointwise(graph: fx.Graph) -> int:
    """Each pointwise op whose 4-D output is channels-last runs on NHWC views of its operands (operands of
    lower rank broadcast from the right: viewed as 4-D first); consecutive wrapped ops share one view."""
    from fusion.lower.schedule import POINTWISE

    back_of: dict[fx.Node, fx.Node] = {}      # a permute back to NCHW -> the NHWC value it views
    count = 0
    for n in list(graph.nodes):
        out = tval(n)
        if n.op != "call_function" or n.target not in POINTWISE or out is None or out.dim() != 4 \
                or any(isinstance(v, fx.Node) for v in n.kwargs.values()):
            continue
        shape = list(out.shape)
        operands = [a for a in n.args if isinstance(a, fx.Node)]
        # channels-last out, or a channels-last full-size operand (an NCHW one first in the op's
        # arguments makes ATen's output NCHW: a residual add of the block's input)
        if not (_nhwc_dense(out) or any(_nhwc_dense(tval(a)) and list(tval(a).shape) == shape for a in operands)):
            continue
        if not all(_broadcasts(tval(a), shape) for a in operands):
            continue
        with graph.inserting_before(n):
            args = tuple(_as_nhwc(graph, a, back_of) if isinstance(a, fx.Node) else a for a in n.args)
            new = graph.call_function(n.target, args, dict(n.kwargs))
            back = graph.call_function(aten.permute.default, (new, TO_NCHW))
        cl = out.contiguous(memory_format=CL)                 # its users may be wrapped next
        new.meta["val"], back.meta["val"] = cl.permute(TO_NHWC), cl
        back_of[back] = new
        n.replace_all_uses_with(back)
        graph.erase_node(n)
        count += 1
    return count


def _broadcasts(v: Any, shape: list[int]) -> bool:
    """A tensor operand that broadcasts to `shape` and can be viewed as 4-D (0-d and 4-D always can)."""
    if not isinstance(v, torch.Tensor):
        return False
    if v.dim() > 4 or any(d != 1 and d != s for d, s in zip(reversed(v.shape), reversed(shape))):
        return False
    return v.dim() in (0, 4) or v.is_contiguous()


def _as_nhwc(graph: fx.Graph, a: fx.Node, back_of: dict[fx.Node, fx.Node]) -> fx.Node:
    if a in back_of:
        return back_of[a]
    v = tval(a)
    if v.dim() == 0:
        return a
    if v.dim() == 4 and not _nhwc_dense(v) and sum(d != 1 for d in v.shape[1:]) > 1:
        # NCHW data meeting channels-last data (e.g. a block's input as its residual): one channels-last
        # copy, shared by every wrapped op that reads it, so the kernels still read contiguous operands
        at = a if a.op != "placeholder" else [p for p in graph.nodes if p.op == "placeholder"][-1]
        with graph.inserting_after(at):
            dense = graph.call_function(aten.contiguous.default, (a,), {"memory_format": CL})
        dense.meta["val"] = v = v.contiguous(memory_format=CL)
        out = graph.call_function(aten.permute.default, (dense, TO_NHWC))
        out.meta["val"] = v.permute(TO_NHWC)
        back_of[a] = out
        return out
    full = [1] * (4 - v.dim()) + list(v.shape)
    nhwc = [full[i] for i in TO_NHWC]
    if v.dim() < 4 and sum(d != 1 for d in full) <= 1:      # e.g. a per-channel [C, 1, 1]: one view
        while a.op == "call_function" and a.target is aten.view.default and _dense(tval(a.args[0])):
            a = a.args[0]                                     # a view of a view: one view of the base
        out = graph.call_function(aten.view.default, (a, nhwc))
        out.meta["val"] = v.view(nhwc)
        return out
    if v.dim() < 4:
        a = graph.call_function(aten.view.default, (a, full))
        a.meta["val"] = v = v.view(full)
    out = graph.call_function(aten.permute.default, (a, TO_NHWC))
    out.meta["val"] = v.permute(TO_NHWC)
    return out


def _contiguous_outputs(graph: fx.Graph) -> None:
    """The program returns what eager returns: NCHW-contiguous 4-D outputs."""
    out = next(n for n in graph.nodes if n.op == "output")

    def fix(a: Any) -> Any:
        if isinstance(a, fx.Node) and _nhwc_dense(tval(a)):
            with graph.inserting_before(out):
                return graph.call_function(aten.contiguous.default, (a,))
        return a

    out.args = (fx.node.map_aggregate(out.args[0], fix),)
