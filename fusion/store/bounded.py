"""A cache directory that stays under its size limit: least recently used entries go first.

    limit_bytes(config_mb)         the limit: Config.cache_limit_mb, else $FUSION_CACHE_LIMIT_MB, else 2048 MB
    used(path)                     mark an entry as just used (its mtime: reads of hits call it)
    wrote(path, nbytes)            count bytes written since the last check (fusion.store.cache calls it)
    enforce(root, limit_mb)        after a compile: scan and evict when enough was written since the last scan
    evict(root, limit) -> (n, b)   remove the least recently used entries until the directory is at 90 % of limit
    usage(root)                    {subdirectory: (entries, bytes)}, for `python -m fusion cache info`
    clear(root)                    remove every entry (`python -m fusion cache clear`)

An entry is one file (with its lock, when one was taken), except a kernel library, whose source, library
and build record (<key>.cpp/.so/.sig) go together. Never evicted or cleared: the directory's trust key and
the calibrated hardware profiles (profiles/: measuring them takes a minute; `clear --all` removes them too). A library evicted while a
process has it loaded stays mapped in that process; the next process that needs it rebuilds it.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

#: the default limit of one cache directory
DEFAULT_LIMIT_MB = 2048
#: scan again after this fraction of the limit was written (a scan stats every file)
RESCAN_FRACTION = 0.05
#: eviction stops at this fraction of the limit (so that it does not run on every write)
LOW_WATER = 0.9
KEPT_FILES = {"trust.key"}
KEPT_DIRS = {"profiles"}

_written: dict[str, int] = {}       # cache root -> bytes written since its last scan (this process)
_scanned: set[str] = set()          # roots scanned by this process


def limit_bytes(config_mb: float | None = None) -> int:
    mb = config_mb if config_mb is not None else float(os.environ.get("FUSION_CACHE_LIMIT_MB") or DEFAULT_LIMIT_MB)
    return int(mb * (1 << 20))


def used(path: str | Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def wrote(root: Path, nbytes: int) -> None:
    _written[str(root)] = _written.get(str(root), 0) + nbytes


def _entries(root: Path, keep_profiles: bool = True) -> list[tuple[float, int, list[Path]]]:
    """(last use, bytes, files) of every evictable entry under root."""
    groups: dict[Path, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if d == root and keep_profiles:
            dirnames[:] = [n for n in dirnames if n not in KEPT_DIRS]
        for name in filenames:
            if d == root and name in KEPT_FILES:
                continue
            p = d / name
            key = p.with_suffix("") if p.suffix == ".lock" else p       # a lock goes with its entry
            if d.name == "kernels" and key.suffix in (".cpp", ".so", ".sig"):
                key = key.with_suffix("")
            groups.setdefault(key, []).append(p)
    out = []
    for files in groups.values():
        mtime, size = 0.0, 0
        for p in files:
            try:
                st = p.stat()
            except OSError:
                continue
            mtime, size = max(mtime, st.st_mtime), size + st.st_size
        out.append((mtime, size, files))
    return out


def evict(root: Path, limit: int) -> tuple[int, int]:
    """Remove least recently used entries until root holds at most LOW_WATER * limit; (entries, bytes) removed.
    Temporary files of writes in progress (younger than an hour) are left alone."""
    entries = _entries(Path(root))
    total = sum(size for _, size, _ in entries)
    removed = freed = 0
    if total <= limit:
        return 0, 0
    now = time.time()
    for mtime, size, files in sorted(entries, key=lambda e: e[0]):
        if total - freed <= LOW_WATER * limit:
            break
        if all(p.name.startswith(".") for p in files) and now - mtime < 3600:
            continue
        for p in files:
            try:
                p.unlink()
            except OSError:
                pass
        removed, freed = removed + 1, freed + size
    return removed, freed


def enforce(root: Path, limit_mb: float | None = None) -> tuple[int, int]:
    """Evict in the cache directory `root` if enough was written there since this process last looked."""
    limit = limit_bytes(limit_mb)
    if str(root) in _scanned and _written.get(str(root), 0) < RESCAN_FRACTION * limit:
        return 0, 0
    _scanned.add(str(root))
    _written[str(root)] = 0
    return evict(root, limit)


def usage(root: Path) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for _, size, files in _entries(Path(root), keep_profiles=False):
        rel = files[0].relative_to(root).parts
        top = rel[0] if len(rel) > 1 else "."
        n, b = out.get(top, (0, 0))
        out[top] = (n + 1, b + size)
    return out


def clear(root: Path, everything: bool = False) -> int:
    """Remove every entry (and the profiles too when `everything`); the trust key stays. Entries removed."""
    n = 0
    for child in Path(root).iterdir():
        if child.name in KEPT_FILES or (child.name in KEPT_DIRS and not everything):
            continue
        if child.is_dir():
            n += sum(len(f) for _, _, f in os.walk(child))
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
            n += 1
    return n
