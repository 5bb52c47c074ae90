"""What fusion trusts on disk, and how it tells: a secret key per cache directory signs what this machine wrote.

A cache entry or a saved program is data, but parts of it end up as code: kernel sources are compiled and
their libraries loaded, graph targets are called. So nothing read from disk is compiled, loaded or called
on the strength of its own content alone:

    key(root)                       the cache directory's secret (32 random bytes, <root>/trust.key, 0o600),
                                    made the first time the directory is used
    sign(parts, root) -> str        HMAC-SHA256 of the parts under that key
    verify(parts, sig, root)        constant-time check of a signature made by sign

Cache entries (fusion.store.cache.write_json) carry such a signature instead of a bare checksum, so an entry
edited by anyone without the key (a consistent sha256 is easy to forge) reads as a miss and is rebuilt.
Kernel libraries are loaded only when their bytes match the hash recorded, signed, when this machine built
them from a source it generated (fusion.backends.cpp.compiler). A saved program carries its writer's key id
and signatures; one signed by another key (another machine, another user) has its kernels generated again
from its graph, and one that claims this key but does not verify was modified: it is refused.

Whatever the signature, a graph read from disk may call only the ops of `fusion.store.serialize`'s allowlist,
and output structures are plain JSON (pytree's own format: only types registered in this process), never a
pickle. The key is as private as the cache directory (0o700): someone who can write it can also run code as
its owner, so it guards against files that come from elsewhere, not against the directory's owner.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Iterable
from pathlib import Path

KEY_FILE = "trust.key"


def key(root: Path) -> bytes:
    """The secret of the cache directory `root`, created (0o600, exclusively: racing processes agree) if missing."""
    path = Path(root) / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    for _ in range(100):  # a racing creator may not have written its bytes yet
        data = path.read_bytes()
        if len(data) == 32:
            break
        time.sleep(0.01)
    else:
        raise RuntimeError(f"{path} is not a fusion trust key (expected 32 bytes); delete it to make a new one")
    return data


def key_id(root: Path) -> str:
    """A public name of `root`'s key (a hash of it): tells a program signed here from one signed elsewhere."""
    return hashlib.sha256(b"fusion key id\0" + key(root)).hexdigest()[:16]


def root_of(path: Path) -> Path:
    """The cache directory holding `path`: the nearest ancestor with a key (fusion.store.cache.cache_dir makes
    one in every cache directory), else the directory of `path` itself (which then gets a key)."""
    for d in Path(path).resolve().parents:
        if (d / KEY_FILE).exists():
            return d
    return Path(path).resolve().parent


def sign(parts: Iterable[bytes], root: Path) -> str:
    mac = hmac.new(key(root), digestmod=hashlib.sha256)
    for p in parts:
        mac.update(hashlib.sha256(p).digest())   # each part hashed first: part boundaries are unambiguous
    return mac.hexdigest()


def verify(parts: Iterable[bytes], signature: object, root: Path) -> bool:
    return isinstance(signature, str) and hmac.compare_digest(sign(parts, root), signature)


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
