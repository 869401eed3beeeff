"""Durable file writes shared by the services that keep state on disk."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path, data: bytes, sync: bool = True) -> None:
    """Write, fsync, rename, then fsync the folder (without sync: atomic against a crash of the
    process, not of the machine)."""
    atomic_write_with(path, lambda f: f.write(data), sync=sync)


def atomic_write_with(
    path: Path, write: Callable[[BinaryIO], object], also: Path | None = None, sync: bool = True
) -> None:
    """Let write() fill a temp file, fsync it, hard-link it as `also` (if given), rename it to path.

    A reader sees either the old file or the whole new one, never a part.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        if also is not None:
            if also.exists():
                also.unlink()
            os.link(tmp, also)  # the snapshot shares the bytes; files are only ever replaced, never edited
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if not sync:
        return
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
