"""Durable file writes, shared by the lake, the warehouse and the artifact store.

A file is written under a temporary name, fsynced, renamed into place and its folder
fsynced: readers see the old file or the whole new one, and a crash never leaves half a
file under the real name. Re-writing the same content is harmless (idempotent jobs).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "fsync_dir"]


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], object], *, mode: int = 0o666) -> Path:
    """Write ``data`` (bytes, or a function writing to the open file) to ``path`` durably.

    ``mode`` (less the umask) is the file's from its creation: 0o600 keeps a file holding a
    secret private at every instant, not only once written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover of a crash would keep its own mode
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as fh:
        if isinstance(data, bytes):
            fh.write(data)
        else:
            data(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path
