"""Crash-safe file writes: readers see the old file or the new one, never a part. Used by the run
directory and by the tokenizer cache (bottom layer: imports nothing of the package).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's files are 0600


def atomic_write_with(path: Path, writer: Callable[[str], None]) -> None:
    """Call ``writer(tmp_path)``, fsync, then ``os.replace(tmp_path, path)``; the temporary file
    (hidden, same directory) is removed if anything fails, and the error is re-raised."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, _FILE_MODE)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace`` (readers see the old
    file or the new one, never a part)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write_with(path, write)
