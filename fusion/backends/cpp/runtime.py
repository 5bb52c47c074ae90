"""Runtime of generated kernels: the call_module wrappers the lowered graph calls, and buffer pools.

Output buffers are reused: writing into freshly mmapped memory (allocations >= 32 MB are mmapped
and unmapped by glibc on every call) runs at a fraction of bandwidth because of page faults. Each
kernel output keeps a small pool of base tensors; a base is handed out again (as a new alias
tensor) only when nobody but the pool references its storage any more, so a buffer someone still
holds (a user, autograd, a view) is never overwritten.
"""
from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable
from typing import Any

import torch

from fusion.lower.specs import KernelSpec

_use_count = torch._C._storage_Use_Count
_MAX_POOL = 4


class BufferPool:
    """Reusable output buffers of one kernel output."""

    __slots__ = ("entries", "lock")

    def __init__(self) -> None:
        self.entries: list[tuple[torch.Tensor, Any]] = []   # (base tensor, its python storage)
        # The use-count check and the hand-out (the view we return raises the count) must be one step,
        # or two threads calling the same module could both be handed the same free buffer.
        self.lock = threading.Lock()

    def get(self, shape: list, dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        if numel < 16384:                                           # small buffers are not pooled
            return torch.empty(shape, dtype=dtype)
        with self.lock:
            for base, st in self.entries:
                # references: the base tensor + the cached python storage object = 2
                if base.dtype is dtype and base.numel() == numel and _use_count(st._cdata) == 2:
                    return base.view(shape)
            base = torch.empty(numel, dtype=dtype)
            if len(self.entries) >= _MAX_POOL:
                self.entries.pop(0)
            self.entries.append((base, base.untyped_storage()))
            return base.view(shape)

    def clear(self) -> None:
        self.entries.clear()


class FusedKernel(torch.nn.Module):
    """A generated C++ kernel (see `source_path`); call it like the fused ops it replaces."""

    def __init__(self, name: str, fn: Callable, spec: KernelSpec, members: list[str], kind: str,
                 source_path: str, num_threads: int | None, description: str = ""):
        super().__init__()
        self.kernel_name = name
        self.fn = fn
        self.spec = spec
        self.members = members
        self.kind = kind
        self.source_path = source_path
        self.num_threads = num_threads
        self.description = description
        self.so_path = ""                                   # set by lower_to_kernels (for pickling)
        self.pools = [BufferPool() for _ in spec.outputs]
        self.__doc__ = f"Fused {kind} kernel {name}: {description or ', '.join(members)}"
        self._call = self._build_call()

    # ctypes function pointers cannot be copied or pickled: rebind from the cached .so instead
    def __reduce__(self):
        return (_restore, (self.kernel_name, self.so_path, self.spec, self.members, self.kind,
                           self.source_path, self.num_threads, self.description))

    def __deepcopy__(self, memo: dict) -> FusedKernel:
        k = FusedKernel(self.kernel_name, self.fn, self.spec, self.members, self.kind, self.source_path,
                        self.num_threads, self.description)
        k.so_path = self.so_path
        return k

    def extra_repr(self) -> str:
        return f"{self.kernel_name}: {self.kind} [{self.description}] fuses {', '.join(self.members)}"

    def __repr__(self) -> str:
        return f"FusedKernel({self.extra_repr()})"

    def forward(self, *xs: torch.Tensor) -> Any:
        return self._call(*xs)

    def _coalesce_conditions(self, R: int) -> list[str] | None:
        """Run-time conditions under which dims R-2 and R-1 are one contiguous inner dim for every operand:
        a vec operand spans both (stride of R-2 == size of R-1), a row operand broadcasts over both."""
        conds = [f"D{R - 2} > 1"]
        for k, s in enumerate(self.spec.inputs):
            i = s.dmap[R - 2]
            if s.vec:
                if i is None or s.last is None:
                    return None
                conds.append(f"sh{k}[{i}] == D{R - 2} and st{k}[{i}] == D{R - 1}")
            elif i is not None:
                conds.append(f"sh{k}[{i}] == 1")
        return conds

    def _build_call(self) -> Callable:
        """Generate a call function specialised to this kernel's ranks and broadcasting (few µs)."""
        spec = self.spec
        R = spec.R
        nin = len(spec.inputs)
        xs = [f"x{k}" for k in range(nin)]
        L = [f"def call({', '.join(xs)}):"]
        for k in range(nin):
            L.append(f"    sh{k} = x{k}.shape")
        for d, (k, i) in enumerate(spec.dsrc):
            L.append(f"    D{d} = sh{k}[{i}]" if k >= 0 else f"    D{d} = {i}")
        dl = f"D{R - 1}"
        if spec.flatten:
            vecs = [k for k, s in enumerate(spec.inputs) if s.vec]
            rows = [k for k, s in enumerate(spec.inputs) if not s.vec]
            conds = [f"x{k}.is_contiguous()" for k in vecs]
            conds += [f"sh{k} == sh{vecs[0]}" for k in vecs[1:]]
            conds += [f"x{k}.numel() == 1" for k in rows]
            conds += [f"len(sh{vecs[0]}) == {R}"]
            dims = [f"sh{vecs[0]}[{d}]" for d in range(R)]
            L.append(f"    if {' and '.join(conds)}:")
            L.append(f"        m = M({', '.join(['1'] * (R - 1) + ['x%d.numel()' % vecs[0]] + ['0'] * ((R - 1) * nin))})")
            L.append(f"        D = [{', '.join(dims)}]")
            L.append("    else:")
            ind = "        "
        else:
            ind = "    "
        strides = []
        for k, s in enumerate(spec.inputs):
            if s.last is not None and s.vec:      # inner dim specialised to stride 1: must span N
                L.append(f"{ind}if sh{k}[{s.last}] != {dl}: bad({k}, x{k}, D{R-1})")
            elif s.last is not None:              # specialised to broadcast (stride 0): must be 1
                L.append(f"{ind}if sh{k}[{s.last}] != 1: bad({k}, x{k}, D{R-1})")
            if s.vec:
                L.append(f"{ind}if {dl} > 1 and x{k}.stride({s.last}) != 1: x{k} = x{k}.contiguous()")
            L.append(f"{ind}st{k} = x{k}.stride()")
            for d in range(R - 1):
                i = s.dmap[d]
                if i is None:
                    strides.append("0")
                    continue
                L.append(f"{ind}if sh{k}[{i}] != D{d} and sh{k}[{i}] != 1: bad({k}, x{k}, D{d})")
                strides.append(f"(0 if sh{k}[{i}] == 1 else st{k}[{i}])")
        L.append(f"{ind}D = [{', '.join(f'D{d}' for d in range(R))}]")
        plain_m = f"m = M({', '.join([f'D{d}' for d in range(R)] + strides)})"
        merge = self._coalesce_conditions(R) if spec.pointwise and R >= 2 else None
        if merge:
            # the last two dims as one inner dim where every operand allows it (NCHW with per-channel
            # operands: rows of H*W instead of W): same memory order, longer vector loops
            merged = ["1"] + [f"D{d}" for d in range(R - 2)] + [f"D{R - 2} * D{R - 1}"]
            for k in range(nin):
                merged += ["0"] + strides[k * (R - 1): k * (R - 1) + R - 2]
            L.append(f"{ind}if {' and '.join(merge)}:")
            L.append(f"{ind}    m = M({', '.join(merged)})")
            L.append(f"{ind}else:")
            L.append(f"{ind}    {plain_m}")
        else:
            L.append(f"{ind}{plain_m}")
        outs = []
        for j, (form, dtype) in enumerate(spec.outputs):
            shape = {"full": "D", "rowk": "D[:-1] + [1]", "rown": "D[:-1]"}[form]
            L.append(f"    o{j} = pool{j}.get({shape}, dt{j})")
            outs.append(f"o{j}")
        ptrs = [f"x{k}.data_ptr()" for k in range(nin)] + [f"{o}.data_ptr()" for o in outs]
        nt = str(self.num_threads) if self.num_threads else "nthreads()"
        L.append(f"    fn({nt}, m, {', '.join(ptrs)})")
        L.append(f"    return {outs[0] if len(outs) == 1 else '(' + ', '.join(outs) + ',)'}")
        src = "\n".join(L)
        nm = self.kernel_name

        def bad(k, t, d):
            raise RuntimeError(f"{nm}: input {k} of shape {tuple(t.shape)} does not broadcast to the kernel domain (dim {d})")

        g = {"fn": self.fn, "nthreads": torch.get_num_threads, "bad": bad,
             "M": ctypes.c_int64 * (R + (R - 1) * nin)}
        for j, (form, dtype) in enumerate(spec.outputs):
            g[f"pool{j}"] = self.pools[j]
            g[f"dt{j}"] = dtype
        exec(_compile_call(src), g)
        self.call_source = src
        return g["call"]


@functools.lru_cache(maxsize=512)
def _compile_call(src: str) -> Any:
    """Call sources depend only on the kernel spec, and a model repeats the same few (one set per layer):
    compiled once each, they cost a dict lookup for the other layers' kernels."""
    return compile(src, "<fusion kernel call>", "exec")


def _restore(name, so_path, spec, members, kind, source_path, num_threads, description):
    from fusion.backends.cpp import compiler as kernel_cache

    fn = bind(kernel_cache.load(so_path), name, len(spec.inputs) + len(spec.outputs))
    k = FusedKernel(name, fn, spec, members, kind, source_path, num_threads, description)
    k.so_path = so_path
    return k


def bind(lib: ctypes.CDLL, name: str, n_ptrs: int) -> Callable:
    fn = getattr(lib, name)
    fn.restype = None
    fn.argtypes = [ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)] + [ctypes.c_void_p] * n_ptrs
    return fn
