"""Kernel specs: how the runtime calls one kernel IR, whichever backend renders it.

A `KernelSpec` says, per dim of the kernel's iteration domain D, where its size comes from (an input's dim
or a constant), and per input which tensor dims line up with D (`InputSpec`). The C++ and Triton runtimes
both take it; `fusion.store.artifact` stores it as JSON.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fusion.dialect.values import is_one, same_dim, same_shape, tval
from fusion.lower import kernel_ir as P


@dataclass
class InputSpec:
    dmap: list            # for each outer dim d of D: the tensor dim aligned with it, or None
    last: int | None      # tensor dim aligned with the last dim of D (None: broadcast / dropped)
    vec: bool             # inner stride specialised to 1
    full_shape: bool      # rank == R and mode full (candidate for flattening)


@dataclass
class KernelSpec:
    R: int
    dsrc: list            # per dim of D: (input index, tensor dim) or (-1, constant size)
    inputs: list[InputSpec]
    outputs: list[tuple[str, torch.dtype]]     # (form, dtype)
    flatten: bool         # pure pointwise: contiguous same-shape operands run as one flat row
    pointwise: bool = False   # no reduction, full outputs: the last two dims may be coalesced at run time


def domain_sources(ir: P.KernelIR) -> list | None:
    R = len(ir.D)
    src = []
    for d in range(R):
        found = None
        for k, inp in enumerate(ir.inputs):
            shape = list(tval(inp.node).shape)
            width = R if inp.mode == "full" else R - 1
            if d >= width:
                continue
            i = d - (width - len(shape))
            if i >= 0 and not is_one(shape[i]) and same_dim(shape[i], ir.D[d]):
                found = (k, i)
                break
        if found is None:
            if isinstance(ir.D[d], torch.SymInt):
                return None
            found = (-1, int(ir.D[d]))
        src.append(found)
    return src


def input_spec(ir: P.KernelIR, inp: P.Input) -> InputSpec:
    R = len(ir.D)
    rank = inp.rank
    width = R if inp.mode == "full" else R - 1
    dmap = []
    for d in range(R - 1):
        i = d - (width - rank)
        dmap.append(i if 0 <= i < rank and d < width else None)
    last = rank - 1 if inp.mode == "full" and rank >= 1 else None
    full_shape = inp.mode == "full" and rank == R and same_shape(list(tval(inp.node).shape), ir.D)
    return InputSpec(dmap=dmap, last=last, vec=inp.vec, full_shape=full_shape)


def kernel_spec(ir: P.KernelIR) -> KernelSpec | None:
    """How the runtime calls one kernel IR (None: it cannot be called; the group stays ATen).
    Shared by the C++ and Triton back ends."""
    dsrc = domain_sources(ir)
    if dsrc is None:
        return None
    ins = [input_spec(ir, i) for i in ir.inputs]
    flatten = not ir.has_reduction and any(s.vec for s in ins) and not any(i.rot for i in ir.inputs) and all(
        s.full_shape if s.vec else all(is_one(d) for d in tval(i.node).shape)
        for s, i in zip(ins, ir.inputs)) and all(o.form == "full" for o in ir.outputs)
    outs = [(o.form, torch.bfloat16 if o.bf16 else torch.float32 if o.dtype == "f" else torch.bool)
            for o in ir.outputs]
    pointwise = not ir.has_reduction and not any(i.rot for i in ir.inputs) and all(o.form == "full" for o in ir.outputs)
    return KernelSpec(R=len(ir.D), dsrc=dsrc, inputs=ins, outputs=outs, flatten=flatten, pointwise=pointwise)
