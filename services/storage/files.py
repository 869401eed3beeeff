"""Durable file writes shared by the services that keep state on disk."""

from __future__ import annotations

import functools
import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np


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


@functools.lru_cache(maxsize=256)
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    d = {"descr": descr, "fortran_order": False, "shape": shape}
    try:
        np.lib.format.write_array_header_1_0(buf, d)
    except ValueError:  # a header over 64 KiB: format 2.0, as np.save picks then
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, d)
    return buf.getvalue()


def write_npy(f: BinaryIO, arr: np.ndarray) -> None:
    """np.save(f, arr, allow_pickle=False), the same bytes. The header of a C-ordered array of a plain
    dtype is made once per dtype and shape instead of formatted anew each call (about 1 µs instead of
    5 µs for a small array here; a saved round's real cost is the file system's, see overwrite_npy)."""
    # object, not numpy's annotation: its stubs say a list, but a plain dtype gives a str
    descr: object = np.lib.format.dtype_to_descr(arr.dtype)
    if not isinstance(descr, str) or arr.dtype.hasobject or not arr.flags.c_contiguous:
        np.save(f, arr, allow_pickle=False)
        return
    f.write(_npy_header(descr, arr.shape))
    f.write(arr.data if arr.ndim else arr.reshape(1).data)


def overwrite_npy(path: Path, arr: np.ndarray) -> None:
    """np.save(path, arr) (".npy" added if missing), writing over the old file in place and cutting it
    only if it shrank. np.save truncates first, and freeing the old blocks costs a filesystem like ext4
    about 0.1 ms: more than the rest of a small model's round at a site. (Like np.save, not atomic.)"""
    if path.suffix != ".npy":
        path = path.with_name(path.name + ".npy")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    with open(fd, "wb", closefd=True) as f:  # "wb" on a descriptor: no truncation
        write_npy(f, arr)
        if f.tell() != os.fstat(fd).st_size:
            f.truncate()
