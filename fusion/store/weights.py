"""Weights on disk without copies: a streaming safetensors writer and a memory-mapped reader.

`save_safetensors` writes each tensor straight from its own memory (no full in-memory serialisation,
unlike building the whole file as bytes); `load_safetensors_mmap` maps the file and returns tensors that
are views of the mapping, so RSS grows only as pages are touched (seed 000: memory-map, never copy).
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Mapping

import torch

_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FROM = {v: k for k, v in _DTYPES.items()}


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> int:
    """Write `tensors` (name -> CPU tensor) in the safetensors format; returns the bytes written."""
    header: dict = {"__metadata__": metadata or {}} if metadata else {}
    offset = 0
    order = []
    for name, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            raise ValueError(f"{name}: only CPU tensors can be saved (got {t.device})")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        order.append((name, t))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, t in order:
            if not t.is_contiguous():
                t = t.contiguous()  # one tensor at a time, only for non-contiguous views
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))   # 0-d too (num_batches_tracked)
    return 8 + len(raw) + offset


def load_safetensors_mmap(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors that are views of a private (copy-on-write) mapping of the file: nothing is read up front.
    A file that is not whole safetensors (truncated, a header that does not parse, a tensor outside the
    file or of the wrong size) raises FusionInputError naming it."""
    from fusion.errors import FusionInputError

    def bad(why: str) -> FusionInputError:
        return FusionInputError(f"{path} is not a whole safetensors file ({why}); save the program again")

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise bad(f"{size} bytes")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise bad(f"its header claims {n} bytes, the file has {size}")
            header = json.loads(f.read(n))
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
    except OSError as e:
        raise FusionInputError(f"{path} cannot be read ({e})") from None
    except ValueError as e:      # json and unicode errors
        raise bad(f"header: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is no table")
    base = 8 + n
    out: dict[str, torch.Tensor] = {}
    header.pop("__metadata__", None)
    for name, info in header.items():
        try:
            start, end = (int(v) for v in info["data_offsets"])
            dtype = _FROM[info["dtype"]]
            shape = [int(v) for v in info["shape"]]
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {name!r} is malformed") from None
        if min(shape, default=0) < 0 or not 0 <= start <= end <= size - base or \
                end - start != math.prod(shape) * dtype.itemsize:
            raise bad(f"tensor {name!r} of shape {shape} does not fit bytes {start}..{end} of the data")
        if end == start:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        flat = torch.frombuffer(mm, dtype=torch.uint8, count=end - start, offset=base + start)
        out[name] = flat.view(dtype).reshape(shape)
    return out
