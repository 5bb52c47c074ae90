"""Compile generated C++ into a shared library, cached on disk, and load it with ctypes.

Key: sha256(source + flags + compiler version). Files live under
`<cache_dir>/kernels/<key>.{cpp,so}`; the cache dir is config.cache_dir, else $FUSION_CACHE_DIR,
else ~/.cache/fusion, created with mode 0o700. Writes are atomic (temp file + os.replace), so
concurrent processes are safe and a second process loads the .so without compiling.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading

CXX = os.environ.get("FUSION_CXX", "g++")
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno",
         "-fno-trapping-math", "-shared", "-fPIC", "-std=c++17"]

_loaded: dict[str, ctypes.CDLL] = {}
_lock = threading.Lock()


class CompileError(RuntimeError):
    pass


def cache_dir(override: str | None = None) -> str:
    d = override or os.environ.get("FUSION_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fusion")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


@functools.cache
def compiler_version(cxx: str) -> str:
    if shutil.which(cxx) is None:
        raise CompileError(f"C++ compiler {cxx!r} not found on PATH")
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise CompileError(f"{cxx} --version failed: {out.stderr.strip()}")
    return out.stdout.splitlines()[0] if out.stdout else cxx


def source_key(source: str) -> str:
    h = hashlib.sha256()
    for part in (source, CXX, " ".join(FLAGS), compiler_version(CXX)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def _atomic_write(path: str, data: bytes) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build(source: str, cache: str | None = None) -> tuple[str, str]:
    """Compile `source` (or reuse the cached build); returns (cpp_path, so_path)."""
    key = source_key(source)
    root = os.path.join(cache_dir(cache), "kernels")
    os.makedirs(root, mode=0o700, exist_ok=True)
    cpp = os.path.join(root, f"{key}.cpp")
    so = os.path.join(root, f"{key}.so")
    if not os.path.exists(cpp):
        _atomic_write(cpp, source.encode())
    if os.path.exists(so):
        return cpp, so
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp-", suffix=".so")
    os.close(fd)
    try:
        cmd = [CXX, *FLAGS, cpp, "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise CompileError(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
        os.chmod(tmp, 0o600)
        os.replace(tmp, so)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return cpp, so


def load(so_path: str) -> ctypes.CDLL:
    with _lock:
        lib = _loaded.get(so_path)
        if lib is None:
            # torch is imported first, so its bundled libgomp.so.1 is reused (one OpenMP pool)
            lib = ctypes.CDLL(so_path)
            _loaded[so_path] = lib
        return lib
