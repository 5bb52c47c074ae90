"""Compile generated C++ into a shared library, cached on disk, and load it with ctypes.

Key: sha256(source + compiler + flags + compiler version). Files live under
`<cache_dir>/kernels/<key>.{cpp,so}` (fusion.store.cache: config.cache_dir, else $FUSION_CACHE_DIR, else
~/.cache/fusion, private to the user). The compiler is `Config.cxx` as `fusion.config.resolve_cxx` reads it
when a build runs (else $FUSION_CXX, else g++), never at import. Writes are atomic (fusion.store.cache),
so concurrent processes are safe and a second process loads the .so without compiling.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import threading

from fusion.config import resolve_cxx
from fusion.store import cache as _cache

FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno",
         "-fno-trapping-math", "-shared", "-fPIC", "-std=c++17"]

_loaded: dict[str, ctypes.CDLL] = {}
_lock = threading.Lock()


class CompileError(RuntimeError):
    pass


@functools.cache
def compiler_version(cxx: str) -> str:
    if shutil.which(cxx) is None:
        raise CompileError(f"C++ compiler {cxx!r} not found on PATH")
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise CompileError(f"{cxx} --version failed: {out.stderr.strip()}")
    return out.stdout.splitlines()[0] if out.stdout else cxx


def source_key(source: str, cxx: str | None = None) -> str:
    """The cache key of `source` compiled by `cxx` (None: resolve_cxx's default): it hashes the source, the
    compiler command, FLAGS and the compiler's version line, so another compiler never reuses a build."""
    cxx = resolve_cxx(cxx)
    h = hashlib.sha256()
    for part in (source, cxx, " ".join(FLAGS), compiler_version(cxx)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def build(source: str, cache: str | None = None, cxx: str | None = None) -> tuple[str, str]:
    """Compile `source` with `cxx` (Config.cxx; None: $FUSION_CXX or g++) into the kernel cache under
    `cache` (Config.cache_dir), or reuse the cached build; returns (cpp_path, so_path)."""
    cxx = resolve_cxx(cxx)
    key = source_key(source, cxx)
    root = _cache.subdir("kernels", cache)
    cpp, so = root / f"{key}.cpp", root / f"{key}.so"
    if not cpp.exists():
        _cache.atomic_write(cpp, source.encode())
    if so.exists():
        return str(cpp), str(so)
    with _cache.atomic_path(so) as tmp:     # the compiler writes the temporary file; renamed when it succeeds
        cmd = [cxx, *FLAGS, str(cpp), "-o", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise CompileError(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
        os.chmod(tmp, 0o600)
    return str(cpp), str(so)


def load(so_path: str) -> ctypes.CDLL:
    with _lock:
        lib = _loaded.get(so_path)
        if lib is None:
            # torch is imported first, so its bundled libgomp.so.1 is reused (one OpenMP pool)
            lib = ctypes.CDLL(so_path)
            _loaded[so_path] = lib
        return lib
