"""Compile generated C++ into a shared library, cached on disk, and load it with ctypes.

Key: sha256(source + compiler + flags + compiler version). Files live under
`<cache_dir>/kernels/<key>.{cpp,so}` (fusion.store.cache: config.cache_dir, else $FUSION_CACHE_DIR, else
~/.cache/fusion, private to the user). The compiler is `Config.cxx` as `fusion.config.resolve_cxx` reads it
when a build runs (else $FUSION_CXX, else g++), never at import. Writes are atomic (fusion.store.cache),
so concurrent processes are safe and a second process loads the .so without compiling.

A library is loaded only when its bytes match the hash this machine recorded when it built it
(`<key>.sig`, signed with the cache directory's key: fusion/store/trust.py). A library replaced or edited
in the cache is never loaded: `build` rebuilds it from the source it was given (with a warning) and
`load` refuses it (`UntrustedLibraryError`). The .cpp next to it is for reading; builds compile the source
they are handed, written afresh, never a .cpp found in the cache.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

from fusion.config import resolve_cxx
from fusion.store import cache as _cache
from fusion.store import bounded, trust

FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno",
         "-fno-trapping-math", "-shared", "-fPIC", "-std=c++17"]

_loaded: dict[str, ctypes.CDLL] = {}
_lock = threading.Lock()


class CompileError(RuntimeError):
    pass


class UntrustedLibraryError(CompileError):
    """A kernel library whose bytes do not match the build this machine recorded for it."""


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
    `cache` (Config.cache_dir), or reuse the cached build when it verifies; returns (cpp_path, so_path)."""
    cxx = resolve_cxx(cxx)
    key = source_key(source, cxx)
    root = _cache.subdir("kernels", cache)
    cpp, so = root / f"{key}.cpp", root / f"{key}.so"
    if _reusable(so, cpp, source):
        return str(cpp), str(so)
    with _cache.exclusive(so):          # processes building the same library: one compiles, the others reuse it
        if _reusable(so, cpp, source):
            return str(cpp), str(so)
        if so.exists() and _sig_path(so).exists():  # (no record: a cache from before records; rebuilt quietly)
            warnings.warn(f"fusion: the kernel library {so} does not match the build recorded for it (modified "
                          f"or replaced); it is not loaded but rebuilt from its source", stacklevel=2)
        _cache.atomic_write(cpp, source.encode())   # the source handed in, whatever a .cpp of that name held
        with _cache.atomic_path(so) as tmp:  # the compiler writes the temporary file; renamed when it succeeds
            cmd = [cxx, *FLAGS, str(cpp), "-o", str(tmp)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise CompileError(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
            os.chmod(tmp, 0o600)
            _record(so, trust.file_hash(tmp))
    return str(cpp), str(so)


def _reusable(so: Path, cpp: Path, source: str) -> bool:
    """The cached build of `source` verifies: mark it used (and restore its readable .cpp if evicted)."""
    if not (so.exists() and _verified(so)):
        return False
    bounded.used(so)
    if not cpp.exists():
        _cache.atomic_write(cpp, source.encode())
    return True


def _sig_path(so: Path) -> Path:
    return so.with_suffix(".sig")


def _record(so: Path, digest: str) -> None:
    """Append the signed hash of a build of `so` (one line, O_APPEND: racing builders each add theirs, and
    whichever build is renamed into place last verifies)."""
    line = f"{digest} {trust.sign([so.name.encode(), digest.encode()], trust.root_of(so))}\n".encode()
    fd = os.open(_sig_path(so), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


_checked: set[tuple] = set()        # (path, inode, size, mtime) of libraries verified by this process


def _verified(so: Path) -> bool:
    """The library's bytes hash to what this machine signed when it built it (checked once per process for
    a file that has not changed since: another inode, size or mtime is checked again)."""
    try:
        st = os.stat(so)
        stamp = (str(so), st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp in _checked:
            return True
        lines = _sig_path(so).read_text().split("\n")
        digest = trust.file_hash(so)
    except OSError:
        return False
    root = trust.root_of(so)
    ok = any(parts[0] == digest and trust.verify([so.name.encode(), digest.encode()], parts[1], root)
             for parts in (line.split(" ") for line in lines) if len(parts) == 2)
    if ok:
        _checked.add(stamp)
    return ok


def load(so_path: str) -> ctypes.CDLL:
    with _lock:
        lib = _loaded.get(so_path)
        if lib is None:
            if not _verified(Path(so_path)):
                raise UntrustedLibraryError(f"{so_path} is not a kernel library this machine built (its bytes do "
                                            f"not match the signed record of its build); not loaded")
            # torch is imported first, so its bundled libgomp.so.1 is reused (one OpenMP pool)
            lib = ctypes.CDLL(so_path)
            _loaded[so_path] = lib
        return lib
