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
        merge = self._coalesce_conditions(spec.R) if spec.pointwise and spec.R >= 2 else None
        src = _call_source(spec, merge, str(self.num_threads) if self.num_threads else "nthreads()")
        g = self._call_globals()
        exec(_compile_call(src), g)
        self.call_source = src
        return g["call"]

    def _call_globals(self) -> dict[str, Any]:
        """The names the generated call source reads: the kernel, its output pools and dtypes, the index
        array type M, and `bad` (the error for an input that does not broadcast to the kernel domain)."""
        spec, nm = self.spec, self.kernel_name

        def bad(k, t, d):
            raise RuntimeError(f"{nm}: input {k} of shape {tuple(t.shape)} does not broadcast to the kernel domain (dim {d})")

        g = {"fn": self.fn, "nthreads": torch.get_num_threads, "bad": bad,
             "M": ctypes.c_int64 * (spec.R + (spec.R - 1) * len(spec.inputs))}
        for j, (form, dtype) in enumerate(spec.outputs):
            g[f"pool{j}"] = self.pools[j]
            g[f"dt{j}"] = dtype
        return g


def _call_source(spec: KernelSpec, merge: list[str] | None, nt: str) -> str:
    """The Python source of `call(x0, x1, ...)` for `spec`: read the domain dims D0.. from the inputs, check
    and stride each operand, fill the index array m (the merged-inner-dim form under the run-time conditions
    `merge`, when given), take the outputs from their pools and call the kernel with `nt` threads."""
    L = _domain_lines(spec)
    ind = "    "
    if spec.flatten:
        L += _flat_fast_path(spec)
        ind = "        "
    checks, strides = _operand_lines(spec, ind)
    L += checks
    L += _index_lines(spec, ind, strides, merge)
    L += _output_lines(spec, nt)
    return "\n".join(L)


def _domain_lines(spec: KernelSpec) -> list[str]:
    """The def line, each input's shape as sh<k>, and each domain dim D<d> (from an input's shape or fixed)."""
    nin = len(spec.inputs)
    L = [f"def call({', '.join(f'x{k}' for k in range(nin))}):"]
    for k in range(nin):
        L.append(f"    sh{k} = x{k}.shape")
    for d, (k, i) in enumerate(spec.dsrc):
        L.append(f"    D{d} = sh{k}[{i}]" if k >= 0 else f"    D{d} = {i}")
    return L


def _flat_fast_path(spec: KernelSpec) -> list[str]:
    """A flattening kernel: when every vec operand is contiguous with one shape (and every row operand one
    element), one flat row of numel elements; the general path follows under `else:`."""
    R, nin = spec.R, len(spec.inputs)
    vecs = [k for k, s in enumerate(spec.inputs) if s.vec]
    rows = [k for k, s in enumerate(spec.inputs) if not s.vec]
    conds = [f"x{k}.is_contiguous()" for k in vecs]
    conds += [f"sh{k} == sh{vecs[0]}" for k in vecs[1:]]
    conds += [f"x{k}.numel() == 1" for k in rows]
    conds += [f"len(sh{vecs[0]}) == {R}"]
    dims = [f"sh{vecs[0]}[{d}]" for d in range(R)]
    return [f"    if {' and '.join(conds)}:",
            f"        m = M({', '.join(['1'] * (R - 1) + ['x%d.numel()' % vecs[0]] + ['0'] * ((R - 1) * nin))})",
            f"        D = [{', '.join(dims)}]",
            "    else:"]


def _operand_lines(spec: KernelSpec, ind: str) -> tuple[list[str], list[str]]:
    """(lines, strides): each operand's checks (its inner dim as specialised, every other dim broadcasting
    to the domain) and its strides st<k>; the stride expressions, R-1 per operand, for the index array."""
    R = spec.R
    dl = f"D{R - 1}"
    L: list[str] = []
    strides: list[str] = []
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
    return L, strides


def _index_lines(spec: KernelSpec, ind: str, strides: list[str], merge: list[str] | None) -> list[str]:
    """D as a list and the index array m = M(dims..., strides...); under `merge` the form with the last two
    dims as one inner dim."""
    R, nin = spec.R, len(spec.inputs)
    L = [f"{ind}D = [{', '.join(f'D{d}' for d in range(R))}]"]
    plain_m = f"m = M({', '.join([f'D{d}' for d in range(R)] + strides)})"
    if not merge:
        return L + [f"{ind}{plain_m}"]
    # the last two dims as one inner dim where every operand allows it (NCHW with per-channel
    # operands: rows of H*W instead of W): same memory order, longer vector loops
    merged = ["1"] + [f"D{d}" for d in range(R - 2)] + [f"D{R - 2} * D{R - 1}"]
    for k in range(nin):
        merged += ["0"] + strides[k * (R - 1): k * (R - 1) + R - 2]
    return L + [f"{ind}if {' and '.join(merge)}:", f"{ind}    m = M({', '.join(merged)})",
                f"{ind}else:", f"{ind}    {plain_m}"]


def _output_lines(spec: KernelSpec, nt: str) -> list[str]:
    """Each output taken from its pool in its form's shape, the kernel call, the return."""
    L, outs = [], []
    for j, (form, dtype) in enumerate(spec.outputs):
        shape = {"full": "D", "rowk": "D[:-1] + [1]", "rown": "D[:-1]"}[form]
        L.append(f"    o{j} = pool{j}.get({shape}, dt{j})")
        outs.append(f"o{j}")
    ptrs = [f"x{k}.data_ptr()" for k in range(len(spec.inputs))] + [f"{o}.data_ptr()" for o in outs]
    L.append(f"    fn({nt}, m, {', '.join(ptrs)})")
    L.append(f"    return {outs[0] if len(outs) == 1 else '(' + ', '.join(outs) + ',)'}")
    return L


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
