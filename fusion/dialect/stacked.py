"""Shared-input matmuls as ONE GEMM: Q/K/V (or gate/up) projections over a weight block, zero-copy.

    y = fusion.stacked_linear(x, [w1, w2, w3], [b1, b2, b3])     # [M, N1+N2+N3]
    q, k, v = y[:, :N1], y[:, N1:N1+N2], y[:, N1+N2:]             # aten.slice views in the graph

computes `x @ wi^T + bi` for every i (the rewrite `fusion/passes/merge.py` puts it where the cost model
predicts one GEMM faster than the separate ones). How it runs:

- **merged**: when the weights are adjacent rows of one storage (w2 starts where w1 ends, same K, each
  row-major; likewise the biases), the whole block is ONE zero-copy view (`torch.as_strided` from w1:
  same storage, nothing allocated) and one GEMM (ATen's addmm/mm, or oneDNN's linear when the gemm pass
  chose it) computes all outputs. `as_strided` checks the block against w1's storage bounds, so memory
  that is not w1's storage is never read.
- **separate** (any other layout: weights that were never made adjacent, replaced by the user, loaded
  from a file...): one GEMM per weight written into its column range of the output: the same values,
  still no weight copy, only slower.

Weights become adjacent once, at optimize time and in place (`make_adjacent`, called by
`fusion.optimize` for every group the rewritten program uses): a block is allocated per group, each
weight copied into its rows, and the Parameter's `.data` rebound to its slice (same shape, dtype and
strides), so the old storage is freed; peak extra memory is one group's weights (seed 000: weights are
never duplicated, hashed or put in a graph; they are referred to by placeholder name).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

aten = torch.ops.aten
_onednn_linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
_onednn_linear = _onednn_linear.default if _onednn_linear is not None else None
_use_count = torch._C._storage_Use_Count


def _rows(ts: Sequence[Tensor], width: int) -> int:
    """How many rows `ts` hold when they are consecutive pieces of one storage, row-major: 2-D [Ni, width]
    (width > 0) or 1-D [Ni] (width == 0), same dtype, each starting where the previous one ends; else -1.
    (Called on every run of a merged product, so it reads only cheap attributes.)"""
    t0 = ts[0]
    es, base, dt = t0.element_size(), t0.data_ptr(), t0.dtype
    step = max(width, 1) * es
    rows = 0
    for t in ts:
        if t.data_ptr() != base + rows * step or t.dtype is not dt:
            return -1
        shape = t.shape
        if width:
            if len(shape) != 2 or shape[1] != width or t.stride() != (width, 1):
                return -1
        elif len(shape) != 1 or (shape[0] > 1 and t.stride()[0] != 1):
            return -1
        rows += shape[0]
    return rows


def _view(t0: Tensor, size: tuple, stride: tuple) -> Optional[Tensor]:
    """A view of t0's storage from t0's first element; None when it would reach past the storage (then the
    other pieces are not in t0's storage: as_strided checks the bounds, so nothing else is ever read)."""
    try:
        return torch.as_strided(t0, size, stride)
    except RuntimeError:
        return None


def weight_block(weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                 transposed: bool = False) -> Optional[tuple[Tensor, Optional[Tensor]]]:
    """(W, b) as zero-copy views of adjacent weights [Ni, K] (and biases [Ni]): W is [sum N, K], or its
    transpose [K, sum N] with `transposed`; b is [sum N] or None without biases. None if not adjacent."""
    if not weights or weights[0].dim() != 2:
        return None
    k = weights[0].shape[1]
    n = _rows(weights, k) if k else -1
    if n < 0:
        return None
    B = None
    if biases[0] is not None:
        if any(b is None for b in biases) or _rows(biases, 0) != n:  # type: ignore[arg-type]
            return None
        B = _view(biases[0], (n,), (1,))
        if B is None:
            return None
    elif any(b is not None for b in biases):
        return None
    W = _view(weights[0], (k, n), (1, k)) if transposed else _view(weights[0], (n, k), (k, 1))
    return None if W is None else (W, B)


def stacked_linear_impl(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], onednn: bool = False) -> Tensor:
    """[x @ w1^T + b1 | x @ w2^T + b2 | ...] as one [M, sum N] tensor: one GEMM over the weight block when
    the weights are adjacent, else one GEMM per weight into its columns (see the module docstring)."""
    if x.dim() == 2:
        dnn = onednn and _onednn_linear is not None and x.shape[0] > 0 and x.dtype == torch.float32 and not x.is_cuda
        blk = weight_block(weights, biases, transposed=not dnn)
        if blk is not None:
            W, B = blk
            if dnn:
                return _onednn_linear(x, W, B, "none", [], "")
            return torch.addmm(B, x, W) if B is not None else torch.mm(x, W)
    if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in (*weights, *biases))):
        return torch.cat([torch.nn.functional.linear(x, w, b) for w, b in zip(weights, biases)], -1)
    n_total = sum(w.shape[0] for w in weights)
    out = x.new_empty((*x.shape[:-1], n_total))
    off = 0
    for w, b in zip(weights, biases):
        n = w.shape[0]
        cols = out.narrow(-1, off, n)
        if x.dim() == 2:
            if b is None:
                torch.mm(x, w.t(), out=cols)
            else:
                torch.addmm(b, x, w.t(), out=cols)
        else:
            cols.copy_(torch.nn.functional.linear(x, w, b))
        off += n
    return out


@torch.library.custom_op("fusion::stacked_linear", mutates_args=())
def stacked_linear(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]]) -> Tensor:
    """x [M, K], weights [Ni, K], biases [Ni] or None -> [M, sum Ni] = [x w1^T + b1 | x w2^T + b2 | ...]."""
    return stacked_linear_impl(x, weights, biases)


@stacked_linear.register_fake
def _(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]]) -> Tensor:
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


# --------------------------------------------------------------------------------------- making weights adjacent
def _exclusive(t: Tensor) -> bool:
    """t owns its whole storage and nothing else references that storage (no other tensor, no view),
    so rebinding t moves the data instead of leaving a second copy alive."""
    if t.storage_offset() != 0 or not t.is_contiguous():
        return False
    st = t.untyped_storage()
    # references: t's TensorImpl + the Python storage object `st` just made = 2
    return st.nbytes() == t.numel() * t.element_size() and _use_count(st._cdata) <= 2


def make_adjacent(tensors: Sequence[Tensor]) -> str:
    """Make `tensors` (same dtype/device, 2-D with one K, or 1-D) consecutive rows of one new block, IN PLACE:
    each tensor's `.data` is rebound to its slice, same shape, dtype and strides; its old storage is freed.

    Returns "adjacent" (already were: nothing done), "stacked" (done), or why not ("shared storage", ...):
    a tensor whose storage someone else also holds (a view, a tied alias, a memory-mapped file) is left as
    it is — moving it would leave a second copy alive — and the program runs the separate GEMMs there."""
    ts = list(tensors)
    if len(ts) < 2 or len({id(t) for t in ts}) != len(ts):
        return "fewer than two distinct tensors"
    width = ts[0].shape[1] if ts[0].dim() == 2 else 0
    if _rows(ts, width) >= 0 and _view(ts[0], (_rows(ts, width), width) if width else (_rows(ts, 0),),
                                        (width, 1) if width else (1,)) is not None:
        return "adjacent"
    t0 = ts[0]
    for t in ts:
        if t.dtype != t0.dtype or t.device != t0.device or t.dim() != t0.dim() or (width and t.shape[1] != width):
            return "different dtype, device or width"
        if not _exclusive(t):
            return "shared storage"
        if t.requires_grad and not t.is_leaf:
            return "not a leaf"
    rows = sum(t.shape[0] for t in ts)
    with torch.no_grad():
        block = torch.empty((rows, width) if width else (rows,), dtype=t0.dtype, device=t0.device)
        off = 0
        for t in ts:
            n = t.shape[0]
            block[off:off + n].copy_(t)
            t.data = block[off:off + n]     # the old storage goes with its last reference (this one)
            off += n
    return "stacked"


def groups_of(gm: torch.fx.GraphModule) -> list[list[str]]:
    """Placeholder names to make adjacent for each merged product of `gm` (the custom op or its lowered call):
    the weights of one product group, and its biases when it has them."""
    targets = (torch.ops.fusion.stacked_linear.default, stacked_linear_impl)
    out: list[list[str]] = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in targets:
            continue
        ws, bs = n.args[1], n.args[2]
        for ts in (ws, bs):
            if all(isinstance(t, torch.fx.Node) and t.op == "placeholder" for t in ts):
                out.append([t.name for t in ts])
    return out
