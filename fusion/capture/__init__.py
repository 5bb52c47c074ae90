"""Capture: a model and its example inputs become an ATen-level FX graph in the fusion dialect.

`capture_module` is what `fusion.optimize` uses (torch.export + core-ATen decompositions, parameters
and buffers lifted to placeholders and bound by name at run time). Inside `torch.compile` the graph
comes from AOTAutograd instead (see fusion/torch_compile.py); both go through `normalize`.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from fusion.dialect import ops  # noqa: F401  (registers torch.ops.fusion.*)
from fusion.dialect.graph_walk import LAYOUT_VARIES, STRIDE_VIEWS, layout_may_differ
from fusion.errors import FusionInputError
from fusion.capture.spellings import normalize_spellings
from fusion.capture.trailing import Builder, flatten_trailing, only_first_output_used, replace_first_output

aten = torch.ops.aten


@dataclass
class Captured:
    """An exported program split into what the compiler sees and how to call it."""

    gm: fx.GraphModule | None           # lifted graph: placeholders = [weights/buffers/constants..., user inputs...]
    program: ExportedProgram | None     # None when the program came from the structural cache (no capture ran)
    input_bindings: list[tuple[str, str]]   # per placeholder: (kind, name) kind in {"param","buffer","constant","user"}
    buffer_mutations: dict[int, str] = field(default_factory=dict)  # output index -> buffer FQN it updates
    num_user_outputs: int = 0
    out_spec: Any = None                # pytree spec of the model's output (how flat outputs are put together)


def check_inputs(model: Any, example_inputs: Any) -> tuple[Any, ...]:
    """Validate what the user passed to optimize/analyze; return the inputs as a tuple."""
    if not isinstance(model, torch.nn.Module):
        if callable(model):
            raise FusionInputError(
                f"fusion.optimize expects a torch.nn.Module, got the function {getattr(model, '__name__', model)!r}; "
                "wrap it (class M(torch.nn.Module): def forward(self, *a): return fn(*a)) or use "
                "torch.compile(fn, backend='fusion')"
            )
        raise FusionInputError(f"fusion.optimize expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise FusionInputError(
            "example_inputs must be a tuple (or list) of the positional arguments of model.forward, "
            f"got {type(example_inputs).__name__}"
        )
    import inspect

    try:
        sig = inspect.signature(model.forward)
        sig.bind(*example_inputs)
    except TypeError as e:
        params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        required = [p.name for p in params if p.default is p.empty]
        raise FusionInputError(
            f"{type(model).__name__}.forward{sig} cannot take the {len(example_inputs)} example input(s) given "
            f"({e}); pass a tuple with one entry per argument (required: {required})"
        ) from None
    except ValueError:
        pass  # no signature available (builtin); let export decide
    return example_inputs


def _decompositions() -> Any:
    """Core-ATen decompositions, except `scaled_dot_product_attention`: the model asked for fused attention,
    and its decomposition (two bmm, softmax, and the fully-masked-row guard of `_safe_softmax`: where, any,
    full_like) is several times slower than SDPA; `normalize` turns it into `fusion.attention`."""
    table = torch.export.default_decompositions()
    table.pop(aten.scaled_dot_product_attention.default, None)
    return table


def capture_module(model: torch.nn.Module, example_inputs: Sequence[Any], dynamic_shapes: Any = None) -> Captured:
    """torch.export the model (non-strict), decompose to core ATen, and lift weights to named placeholders.
    `dynamic_shapes` (torch.export's argument; fusion.capture.shapes builds it) marks sizes to keep symbolic."""
    ep = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes, strict=False)
    ep = ep.run_decompositions(_decompositions())
    gm = ep.graph_module
    kinds = {
        InputKind.PARAMETER: "param",
        InputKind.BUFFER: "buffer",
        InputKind.CONSTANT_TENSOR: "constant",
        InputKind.USER_INPUT: "user",
        InputKind.CUSTOM_OBJ: "constant",
        InputKind.TOKEN: "token",
    }
    bindings = []
    for spec in ep.graph_signature.input_specs:
        kind = kinds[spec.kind]
        if kind == "token":
            raise NotImplementedError("graphs with effect tokens are not supported")
        bindings.append((kind, spec.target if kind != "user" else spec.arg.name))
    mutations = {}
    n_user = 0
    for i, spec in enumerate(ep.graph_signature.output_specs):
        if spec.kind == OutputKind.BUFFER_MUTATION:
            mutations[i] = spec.target
        elif spec.kind == OutputKind.USER_OUTPUT:
            n_user += 1
        else:
            raise NotImplementedError(f"output kind {spec.kind} is not supported")
    gm = normalize(gm)
    return Captured(gm, ep, bindings, mutations, n_user, ep.call_spec.out_spec)


# ----------------------------------------------------------------------------------------------
# normalize: ATen graph -> fusion dialect


def _last_dim_only(normalized_shape: Any, val: Any) -> bool:
    return isinstance(normalized_shape, (list, tuple)) and len(normalized_shape) == 1 and val is not None and len(val.shape) >= 1


def _rank(x: Any) -> int | None:
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _noop_clone(node: fx.Node) -> bool:
    """A clone whose copy nobody can observe: of a contiguous intermediate, not a graph output (which
    could then alias another output), not of a graph input. AOTAutograd emits these around views."""
    src = node.args[0]
    if not isinstance(src, fx.Node) or src.op == "placeholder" or node.kwargs.get("memory_format") not in (
            None, torch.contiguous_format):
        return False
    val = src.meta.get("val")
    if not isinstance(val, torch.Tensor) or not val.is_contiguous() or layout_may_differ(src):
        return False
    return all(u.op != "output" for u in node.users)


def _sdpa_to_attention(node: fx.Node) -> None:
    """`aten.scaled_dot_product_attention` without dropout -> `fusion.attention` (the same function: it runs
    SDPA; the default scale made explicit). Other forms keep the ATen op."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    a = dict(zip(names, node.args), **node.kwargs)
    q, k = a["query"].meta.get("val"), a["key"].meta.get("val")
    if (a.get("dropout_p") or 0.0) != 0.0 or q is None or k is None or q.dim() < 3 or k.dim() < 3:
        return
    if q.shape[-3] != k.shape[-3] and not a.get("enable_gqa", False):
        return
    scale = a.get("scale")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    node.target = torch.ops.fusion.attention.default
    node.args = (a["query"], a["key"], a["value"], a.get("attn_mask"), scale, bool(a.get("is_causal", False)))
    node.kwargs = {}


_BN_EVAL = {aten._native_batch_norm_legit_no_training.default: (5, 6), aten.native_batch_norm.default: (6, 7)}


def _batch_norm_eval(g: fx.Graph, node: fx.Node) -> bool:
    """Inference batch norm (running statistics) -> pointwise ATen ops over the channel dim:
    `(x - mean) * rsqrt(var + eps) * w + b`, each statistic viewed as [C, 1, ...]. The scheduler then fuses
    it with what surrounds it (ReLU, a residual add) and computes rsqrt(var + eps) once per channel.
    Only when the batch statistics outputs are unused and every tensor has x's dtype."""
    if node.target is aten.native_batch_norm.default and node.args[5] is not False:
        return False  # training: batch statistics
    if not only_first_output_used(node):
        return False
    x, w, b, mean, var = node.args[:5]
    eps = node.args[_BN_EVAL[node.target][1]]
    xv = x.meta.get("val") if isinstance(x, fx.Node) else None
    if xv is None or not xv.dtype.is_floating_point or xv.dim() < 2 or not isinstance(eps, float | int):
        return False
    for t in (w, b, mean, var):
        if t is not None and (not isinstance(t, fx.Node) or t.meta.get("val") is None
                              or t.meta["val"].dtype != xv.dtype or t.meta["val"].dim() != 1):
            return False
    if mean is None or var is None:
        return False
    shape = [xv.shape[1]] + [1] * (xv.dim() - 2)
    op = Builder(g, xv).op
    with g.inserting_before(node):
        inv = op(aten.rsqrt.default, op(aten.add.Tensor, op(aten.view.default, var, shape), float(eps)))
        y = op(aten.mul.Tensor, op(aten.sub.Tensor, x, op(aten.view.default, mean, shape)), inv)
        if w is not None:
            y = op(aten.mul.Tensor, y, op(aten.view.default, w, shape))
        if b is not None:
            y = op(aten.add.Tensor, y, op(aten.view.default, b, shape))
    replace_first_output(g, node, y)
    return True


def normalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Bring an ATen graph into the fusion dialect, in place:

    - `native_layer_norm(x, [N], w, b, eps)[0]` over the last dim, with mean/rstd unused → `fusion.layer_norm`
      (in training graphs mean/rstd feed the backward, so the ATen op stays);
    - `aten.scaled_dot_product_attention` (kept by capture, no dropout) → `fusion.attention`;
    - inference batch norm (running statistics) → pointwise ATen ops over the channel dim, so that it fuses;
    - reductions over the last k >= 2 dims, multi-dim `native_layer_norm` and inference `native_group_norm` →
      last-dim forms between flattening views (`fusion/capture/trailing.py`), so the norm rules and row kernels apply;
    - `aten.alias` and no-op `aten.clone` of a contiguous intermediate → the value itself (functional graph:
      nothing can observe the copy); `aten._unsafe_view` → `aten.view`; `transpose`/`t` → `permute` (as export emits);
    - spellings of one value as one form (`max(...).values` -> amax, baddbmm -> bmm + add, an empty cache's
      `cat`, tensor constants of mask fills; `fusion/capture/spellings.py`);
    - dead code is removed.
    """
    g = gm.graph
    normalize_spellings(gm)
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.native_layer_norm.default and only_first_output_used(node):
            x, shape, w, b, eps = node.args
            xv = x.meta.get("val") if isinstance(x, fx.Node) else None
            if not _last_dim_only(shape, xv):
                continue
            with g.inserting_before(node):
                ln = g.create_node(
                    "call_function", torch.ops.fusion.layer_norm.default, (x, w, b, float(eps)), name="layer_norm"
                )
            for user in list(node.users):
                user.replace_all_uses_with(ln)
                ln.meta = dict(user.meta)
                g.erase_node(user)
            g.erase_node(node)
        elif node.target is aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            g.erase_node(node)
        elif node.target in (aten.transpose.int, aten.t.default) and _rank(node.args[0]) is not None:
            rank = _rank(node.args[0])  # AOTAutograd keeps transpose/t; export decomposes them to permute
            d0, d1 = (node.args[1], node.args[2]) if node.target is aten.transpose.int else (0, 1 if rank > 1 else 0)
            perm = list(range(rank))
            if rank:
                perm[d0 % rank], perm[d1 % rank] = perm[d1 % rank], perm[d0 % rank]
            node.target, node.args, node.kwargs = aten.permute.default, (node.args[0], perm), {}
        elif node.target is aten._unsafe_view.default:
            node.target = aten.view.default  # the same in a functional graph; rules know view
        elif node.target is aten.clone.default and _noop_clone(node):
            node.replace_all_uses_with(node.args[0])
            g.erase_node(node)
        elif node.target is aten.scaled_dot_product_attention.default:
            _sdpa_to_attention(node)
        elif node.target in _BN_EVAL:
            _batch_norm_eval(g, node)
    _copy_where_layout_varies(g)
    flatten_trailing(gm)
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    return gm


def _copy_where_layout_varies(g: fx.Graph) -> None:
    """Views of an attention output (`fusion.attention`, SDPA) are valid for the strides its fake value has;
    at run time SDPA's output follows q's memory order, and the program's fused kernels write q contiguous:
    traced on HF's transposed q the output is [B, S, H, D] in memory, export drops the model's
    `.transpose(1, 2).contiguous()`, and at run time the contiguous [B, H, S, D] result cannot be viewed. Each view chain is replayed on meta tensors of both
    layouts, and where a view is invalid for either, a contiguous copy goes before it — as the model's own
    `.contiguous()` did."""
    for node in list(g.nodes):
        if node.op != "call_function" or not (node.target in LAYOUT_VARIES):
            continue
        out = node
        if isinstance(node.meta.get("val"), (tuple, list)):   # the flash op's (out, logsumexp, ...): its output
            out = next((u for u in node.users if u.target is operator.getitem and u.args[1] == 0), None)
            if out is None:
                continue
        val = out.meta.get("val")
        if not isinstance(val, torch.Tensor) or not all(isinstance(d, int) for d in val.shape):
            continue
        layouts = [torch.empty(val.shape, device="meta"), torch.empty_strided(val.shape, val.stride(), device="meta")]
        stack = [(u, layouts) for u in out.users]
        while stack:
            user, ins = stack.pop()
            if user.op != "call_function" or user.target not in STRIDE_VIEWS or user.args[0] is not user.args[0]:
                continue
            rest = user.args[1:]
            if any(isinstance(a, fx.Node) for a in pytree.tree_leaves((rest, user.kwargs))):
                continue                      # symbolic view arguments: nothing to replay
            try:
                outs = [user.target(t, *rest, **user.kwargs) for t in ins]
            except (RuntimeError, ValueError):   # invalid for one of the layouts: copy first
                with g.inserting_before(user):
                    copy = g.call_function(aten.clone.default, (user.args[0],), {"memory_format": torch.contiguous_format})
                copy.meta = dict(user.args[0].meta)
                user.args = (copy, *rest)
                continue
            stack += [(u, outs) for u in user.users]


def example_value(node: fx.Node) -> Any:
    return node.meta.get("val")
