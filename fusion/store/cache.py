"""The on-disk cache: where it lives, atomic writes, checksummed entries.

Layout under the cache dir ($FUSION_CACHE_DIR, else ~/.cache/fusion; created private to the user):
    graphs/<key>.json     rewritten graphs (structure only, never weights), keyed by graph_key + config + versions
                          + the hardware profile (profile_identity)
    modules/<key>.json    whole compiled programs (lowered graph, kernel specs and sources; never weights), keyed
                          by the module's computation traced on fake tensors (structural.py), consulted before capture
    kernels/...           compiled kernels (fusion/backends/cpp/compiler.py)
    triton/...            generated Triton sources (fusion/backends/triton/runtime.py)
    profiles/...          calibrated hardware profiles
Every entry is written to a temporary file and renamed into place, so concurrent processes never see a
partial file; JSON entries carry a sha256 of their payload and are rebuilt when it does not match.
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


def cache_dir(override: str | None = None) -> Path:
    """The cache root: `override` (Config.cache_dir), else $FUSION_CACHE_DIR, else ~/.cache/fusion; created
    (mode 0o700) if missing. The one place that default is spelled."""
    root = Path(override or os.environ.get("FUSION_CACHE_DIR") or Path.home() / ".cache" / "fusion")
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
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
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` all at once (see atomic_path)."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(data)


def write_json(path: Path, payload: Any) -> None:
    body = json.dumps(payload, sort_keys=True)
    entry = {"sha256": hashlib.sha256(body.encode()).hexdigest(), "payload": body}
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
    """The payload, or None when missing, truncated or corrupted (the caller rebuilds and overwrites it)."""
    try:
        entry = json.loads(path.read_bytes())
        body = entry["payload"]
        if hashlib.sha256(body.encode()).hexdigest() != entry["sha256"]:
            return None
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
