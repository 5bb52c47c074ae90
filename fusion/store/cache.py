"""The on-disk cache: where it lives, atomic writes, checksummed entries.

Layout under the cache dir ($FUSION_CACHE_DIR, else ~/.cache/fusion; created private to the user):
    graphs/<key>.json     rewritten graphs (structure only, never weights), keyed by graph_key + config + versions
                          + the hardware profile (profile_identity)
    modules/<key>.json    whole compiled programs (lowered graph, kernel specs and sources; never weights), keyed
                          by the module's computation traced on fake tensors (structural.py), consulted before capture
    kernels/...           compiled kernels (fusion/backends/cpp/compiler.py)
    triton/...            generated Triton sources (fusion/backends/triton/runtime.py)
    profiles/...          calibrated hardware profiles
    trust.key             the directory's secret: signs what this machine wrote (fusion/store/trust.py)
The directory is kept under a size limit (fusion/store/bounded.py: Config.cache_limit_mb, else
$FUSION_CACHE_LIMIT_MB, else 2 GiB), least recently used entries first; `python -m fusion cache info|clear`.
Every entry is written to a temporary file and renamed into place, so concurrent processes never see a
partial file; JSON entries carry a signature of their payload made with the directory's secret key
(<dir>/trust.key, fusion/store/trust.py) and are rebuilt when it does not match: a truncated, corrupted or
edited entry is a miss, never code that runs.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fusion.store import bounded, trust


def cache_dir(override: str | None = None) -> Path:
    """The cache root: `override` (Config.cache_dir), else $FUSION_CACHE_DIR, else ~/.cache/fusion; created
    (mode 0o700) if missing. The one place that default is spelled."""
    root = Path(override or os.environ.get("FUSION_CACHE_DIR") or Path.home() / ".cache" / "fusion")
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not (root / trust.KEY_FILE).exists():
        trust.key(root)                 # entries written here are signed with it (fusion.store.trust)
    return root


def subdir(name: str, override: str | None = None) -> Path:
    """`<cache_dir(override)>/<name>`, created (mode 0o700) if missing."""
    d = cache_dir(override) / name
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A fresh temporary file (mode 0o600) next to `path` for the block to fill (write it, or have a compiler
    write it); renamed onto `path` when the block exits cleanly, removed when it raises. Readers of `path`
    therefore never see a partial file, whatever the number of concurrent writers."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        size = os.path.getsize(tmp)
        os.replace(tmp, path)
        bounded.wrote(trust.root_of(path), size)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


#: longest wait for another process's compile of the same entry; past it this process compiles it too
LOCK_WAIT_S = 900.0


@contextlib.contextmanager
def exclusive(path: Path, wait_s: float | None = None) -> Iterator[bool]:
    """Hold the lock `<path>.lock` (fcntl.flock, exclusive) for the block: processes and ranks about to build
    the same entry take turns, so one builds it and the others find it built. Yields whether the lock was
    taken (False after `wait_s` seconds, default LOCK_WAIT_S, or where locks are not supported: the block then
    runs anyway; atomic writes keep that safe, only the work is repeated). Locks held by one process do not
    nest (a second `exclusive` on the same path in the same process waits for the first)."""
    import fcntl
    import time

    lock = Path(str(path) + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield False
        return
    try:
        deadline = time.monotonic() + (LOCK_WAIT_S if wait_s is None else wait_s)
        taken, pause = False, 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                taken = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(pause)
                pause = min(2 * pause, 0.2)
            except OSError:     # a filesystem without flock
                break
        yield taken
    finally:
        os.close(fd)                        # releases the lock


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` all at once (see atomic_path)."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(data)


def write_json(path: Path, payload: Any) -> None:
    """Write `payload` signed with the key of the cache directory holding `path` (fusion.store.trust)."""
    body = json.dumps(payload, sort_keys=True)
    entry = {"hmac": trust.sign([body.encode()], trust.root_of(path)), "payload": body}
    atomic_write(path, json.dumps(entry).encode())


def jsonable(d: dict) -> dict:
    """`d` with every value that JSON cannot hold replaced by its str()."""
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
            out[k] = v
        except (TypeError, ValueError):
            out[k] = str(v)
    return out


def read_json(path: Path) -> Any | None:
    """The payload, or None when missing, truncated, corrupted or not signed by this cache directory's key
    (edited, or written elsewhere): the caller rebuilds and overwrites it."""
    try:
        entry = json.loads(path.read_bytes())
        body = entry["payload"]
        if not trust.verify([body.encode()], entry.get("hmac"), trust.root_of(path)):
            return None
        bounded.used(path)              # least recently used entries are evicted first (fusion.store.bounded)
        return json.loads(body)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def profile_identity(hw: Any) -> str:
    """A cache-key part naming a hardware profile (None: the default one): its machine key, name and
    source, so that entries priced under one calibration are not reused under another."""
    return f"hw={getattr(hw, 'key', '')}|{getattr(hw, 'name', '')}|{getattr(hw, 'source', '')}"


@functools.lru_cache(maxsize=1)
def versions() -> str:
    """Library versions plus a hash of our own rewrite/cost sources: any change invalidates cached graphs."""
    import torch

    try:
        from importlib.metadata import version

        egglog_version = version("egglog")
    except Exception:  # noqa: BLE001
        egglog_version = "?"
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]          # the fusion package
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return f"torch={torch.__version__};egglog={egglog_version};src={h.hexdigest()[:16]}"
