"""A file's content hash, computed once per process for a given path, size and mtime.

What keys a local data file or a GGUF model. A reader that has just read a file's bytes hands them
here (`remember`), so keying the file never reads it a second time.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_KNOWN: dict[tuple[str, int, int], str] = {}


def _stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def content_sha256(path: Path) -> str:
    """The sha256 of the file's bytes (OSError when it cannot be read)."""
    stamp = _stamp(path)
    if stamp not in _KNOWN:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _KNOWN[stamp] = h.hexdigest()
    return _KNOWN[stamp]


def remember(path: Path, data: bytes, stamp: tuple[str, int, int] | None = None) -> bytes:
    """Record the sha256 of `data`, the bytes just read from `path` (under `stamp`, the file's stamp taken before
    the read, when given); returns them."""
    _KNOWN[stamp or _stamp(path)] = hashlib.sha256(data).hexdigest()
    return data


def read_bytes(path: Path) -> bytes:
    """The file's bytes, their sha256 remembered under the stamp taken *before* the read: a file written meanwhile
    has another stamp by the next ask, so the hash of the bytes read never stands for newer content."""
    stamp = _stamp(path)
    return remember(path, path.read_bytes(), stamp)
