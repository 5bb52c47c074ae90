"""Loading and calling Triton kernels rendered by `fusion.backends.triton.render`.

    mod = load_source(src, cache_dir)              # writes <cache>/triton/<name>_<hash>.py, imports it
    k = TritonKernel(name, mod, spec, members, kind, source_path, description)
    out = k(*inputs)                               # same calling convention as runtime.FusedKernel

`TritonKernel` is the GPU twin of `fusion.backends.cpp.runtime.FusedKernel`: it takes the same `runtime.KernelSpec`
(built by lower.py from the KernelIR) and is called with the same tensors, so lowering only has to
pick the class by device. Compiled binaries live in Triton's own cache ($TRITON_CACHE_DIR, default
~/.triton/cache); the generated source is kept under the fusion kernel cache so explain()/reports can
point at it (`source_path`).

Output dtype: `out_dtypes` when given (lowering passes the dtypes of the graph's output nodes, which is
right for groups with casts inside, e.g. LLaMA's fp16 -> fp32 RMSNorm -> fp16); otherwise float outputs
take the promoted dtype of the float tensor inputs of rank >= 1 (fp16 in, fp16 out, as eager) and bool
outputs stay bool. Arithmetic is fp32 inside the kernel either way.
"""
from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from fusion.store import cache as _cache
from fusion.backends.cpp.runtime import KernelSpec

#: longest row (elements) a single-pass row kernel takes; longer rows use the looped kernel
MAX_SINGLE = 16384
LOOP_BLOCK = 2048
PW_BLOCK = 1024        # elements per pointwise program (BLOCK_R * BLOCK_N)
ROW_ELEMS = 2048       # elements per single-pass row program when rows are short (BLOCK_R * BLOCK_N)

_MODULES: dict[str, ModuleType] = {}


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def source_dir(cache_dir: str | None = None) -> Path:
    return _cache.subdir("triton", cache_dir)


def load_source(src: str, name: str, cache_dir: str | None = None) -> tuple[ModuleType, str]:
    """Write `src` (content-addressed) under the cache and import it; returns (module, path)."""
    h = hashlib.sha256(src.encode()).hexdigest()[:16]
    path = source_dir(cache_dir) / f"{name}_{h}.py"
    key = str(path)
    if key in _MODULES:
        return _MODULES[key], key
    if not path.exists() or path.read_text() != src:
        _cache.atomic_write(path, src.encode())
    modname = f"fusion_triton_{name}_{h}"
    spec = importlib.util.spec_from_file_location(modname, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod          # triton's jit reads the source through inspect
    spec.loader.exec_module(mod)
    _MODULES[key] = mod
    return mod, key


def _warps(elems: int) -> int:
    return 16 if elems >= 8192 else 8 if elems >= 4096 else 4


def float_out_dtype(xs) -> torch.dtype:
    fl = [x for x in xs if x.is_floating_point()]
    big = [x for x in fl if x.dim() > 0] or fl
    dt = None
    for x in big:
        dt = x.dtype if dt is None else torch.promote_types(dt, x.dtype)
    return dt or torch.float32


class TritonKernel(torch.nn.Module):
    """A generated Triton kernel (see `source_path`); call it like the fused ops it replaces."""

    def __init__(self, name: str, module: ModuleType, spec: KernelSpec, members: list[str], kind: str,
                 source_path: str, description: str = "", out_dtypes: list | None = None):
        super().__init__()
        self.out_dtypes = out_dtypes
        self.kernel_name = name
        self.module = module
        self.spec = spec
        self.members = members
        self.kind = kind
        self.source_path = source_path
        self.description = description
        self.rows_kernel = getattr(module, "KIND", "pointwise") == "rows"
        self.max_single = MAX_SINGLE
        self.__doc__ = f"Fused {kind} Triton kernel {name}: {description or ', '.join(members)}"

    def extra_repr(self) -> str:
        return f"{self.kernel_name}: triton {self.kind} [{self.description}] fuses {', '.join(self.members)}"

    def _bad(self, k: int, t: torch.Tensor, d: int):
        raise RuntimeError(f"{self.kernel_name}: input {k} of shape {tuple(t.shape)} does not broadcast "
                           f"to the kernel domain (dim {d})")

    def forward(self, *xs: torch.Tensor) -> Any:
        spec = self.spec
        R = spec.R
        D = [xs[k].shape[i] if k >= 0 else i for k, i in spec.dsrc]
        N = D[-1]
        rows = 1
        for d in D[:-1]:
            rows *= d
        args: list = []
        flat = False
        if spec.flatten:
            vecs = [x for x, s in zip(xs, spec.inputs) if s.vec]
            flat = (bool(vecs) and all(x.is_contiguous() and x.shape == vecs[0].shape and x.dim() == R
                                       for x in vecs)
                    and all(x.numel() == 1 for x, s in zip(xs, spec.inputs) if not s.vec))
        if flat:
            kd = [1] * (R - 1) + [vecs[0].numel()]
            for s in spec.inputs:
                args += [0] * (R - 1) + ([1] if s.vec else [])
        else:
            kd = list(D)
            for k, (x, s) in enumerate(zip(xs, spec.inputs)):
                sh, st = x.shape, x.stride()
                if s.last is not None and sh[s.last] != N and sh[s.last] != 1:
                    self._bad(k, x, R - 1)
                for d in range(R - 1):
                    i = s.dmap[d]
                    if i is None:
                        args.append(0)
                        continue
                    if sh[i] != D[d] and sh[i] != 1:
                        self._bad(k, x, d)
                    args.append(0 if sh[i] == 1 else st[i])
                if s.vec:
                    args.append(0 if sh[s.last] == 1 else st[s.last])
        fdt = float_out_dtype(xs)
        dev = xs[0].device if xs else torch.device("cuda")
        outs = []
        for j, (form, dtype) in enumerate(spec.outputs):
            shape = {"full": D, "rowk": D[:-1] + [1], "rown": D[:-1]}[form]
            dt = self.out_dtypes[j] if self.out_dtypes else fdt if dtype.is_floating_point else dtype
            outs.append(torch.empty(shape, dtype=dt, device=dev))
        if rows > 0 and N > 0:
            self._launch(xs, outs, kd, args)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _launch(self, xs, outs, kd, strides) -> None:
        mod = self.module
        rows = 1
        for d in kd[:-1]:
            rows *= d
        N = kd[-1]
        if not self.rows_kernel:
            bn = min(PW_BLOCK, next_pow2(N))
            br = max(1, min(next_pow2(rows), PW_BLOCK // bn))
            grid = (triton_cdiv(rows, br) * triton_cdiv(N, bn),)
            kern = mod.POINTWISE
        elif N <= self.max_single:
            bn = next_pow2(N)
            br = max(1, min(next_pow2(rows), ROW_ELEMS // bn))
            grid = (triton_cdiv(rows, br),)
            kern = mod.SINGLE
        else:
            bn, br = LOOP_BLOCK, 1
            grid = (rows,)
            kern = mod.LOOP
        kern[grid](*xs, *outs, *kd, *strides, BLOCK_R=br, BLOCK_N=bn, num_warps=_warps(br * bn))

    def run_looped(self, *xs: torch.Tensor) -> Any:
        """Force the looped row kernel (tests; rows that do not fit one block take it anyway)."""
        old, self.max_single = self.max_single, 0
        try:
            return self.forward(*xs)
        finally:
            self.max_single = old


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def compile_kernel(ir, spec: KernelSpec, cache_dir: str | None = None, kind: str | None = None,
                   description: str = "", out_dtypes: list | None = None) -> TritonKernel:
    """Render `ir`, write and import its source, and wrap it (no GPU work happens until the first call)."""
    from fusion.backends.triton.render import is_row_kernel, render_triton

    src = render_triton(ir)
    mod, path = load_source(src, ir.name, cache_dir)
    kind = kind or ("row_reduction" if is_row_kernel(ir) else "pointwise")
    desc = description or (" -> ".join(m.name for m in ir.members[:6]) + (" ..." if len(ir.members) > 6 else ""))
    return TritonKernel(ir.name, mod, spec, [m.name for m in ir.members], kind, path, desc, out_dtypes)
