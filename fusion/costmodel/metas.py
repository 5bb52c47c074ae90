"""Metas: shapes, sizes and bytes of tensor metas (symbolic-safe), for the roofline and its callers.

A "meta" is anything with .shape and .dtype (a FakeTensor, a real tensor, TensorMetadata); stride is
used when present to count the distinct elements of a broadcast (expanded, stride-0) operand once.
Symbolic sizes use their hint (fusion.dialect.values.hint); a missing or odd meta counts 0 (never raises).

    is_tensor_meta(m), shape_of(m), numel(m), itemsize(m), nbytes(m), distinct_bytes(m)
    flat_metas(x)      every tensor meta in a nested value
    node_val(n)        an FX node's meta ("val", else "tensor_meta"); anything else as it is
    map_args(a)        args/kwargs with each FX node replaced by its meta
"""
from __future__ import annotations

import torch

from fusion.dialect.values import hint as to_int


def is_tensor_meta(m) -> bool:
    return hasattr(m, "shape") and hasattr(m, "dtype") and isinstance(getattr(m, "dtype"), torch.dtype)


def shape_of(m) -> tuple[int, ...]:
    try:
        return tuple(to_int(d) for d in m.shape)
    except Exception:
        return ()


def numel(m) -> int:
    n = 1
    for d in shape_of(m):
        n *= d
    return n


def itemsize(m) -> int:
    try:
        return m.dtype.itemsize
    except Exception:
        return 4


def nbytes(m) -> float:
    """Bytes of a tensor as written (dense): numel * itemsize."""
    return float(numel(m) * itemsize(m)) if is_tensor_meta(m) else 0.0


def distinct_bytes(m) -> float:
    """Bytes a kernel must read for operand m: its own elements, each once. A broadcast (stride-0)
    dim does not multiply the count, so an expanded [1,1,S,S] mask costs S*S elements."""
    if not is_tensor_meta(m):
        return 0.0
    shape = shape_of(m)
    stride = None
    try:
        stride = tuple(to_int(s, 1) for s in m.stride())
    except Exception:
        try:
            stride = tuple(to_int(s, 1) for s in m.stride)
        except Exception:
            stride = None
    n = 1
    for i, d in enumerate(shape):
        if stride is not None and i < len(stride) and stride[i] == 0:
            continue
        n *= d
    return float(n * itemsize(m))


def flat_metas(x) -> list:
    """All tensor metas in a (nested) value: a meta, a tuple/list of them, None, ints..."""
    if is_tensor_meta(x):
        return [x]
    if isinstance(x, (list, tuple)):
        return [m for v in x for m in flat_metas(v)]
    return []


def node_val(n):
    if not isinstance(n, torch.fx.Node):
        return n
    v = n.meta.get("val")
    if v is None:
        v = n.meta.get("tensor_meta")
    return v


def map_args(a):
    """An op's args/kwargs with every FX node replaced by its meta (`node_val`), containers rebuilt."""
    if isinstance(a, torch.fx.Node):
        return node_val(a)
    if isinstance(a, (list, tuple)):
        return type(a)(map_args(x) for x in a) if not hasattr(a, "_fields") else a
    if isinstance(a, dict):
        return {k: map_args(v) for k, v in a.items()}
    return a
