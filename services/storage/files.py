"""Durable file writes shared by the services that keep state on disk."""

from __future__ import annotations

import functools
import io
import os
import tempfile
import threading
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


class NpySaver:
    """Local saves off the caller's path: one writer thread, at most one pending save per file.

    A save of a file that is still waiting replaces it (only the newest array is written, and the older one
    is freed). The arrays waiting take at most ``budget_bytes`` (a single array may exceed it alone): past
    that, save() waits for the writer, so memory stays bounded however many files (sites) save at once and
    however slow the disk is. flush(path) waits until the newest save of path is on disk (a reader of the
    file calls it first). Arrays handed in must not change afterwards. Bytes: overwrite_npy's (np.save's).
    """

    def __init__(self, budget_bytes: int = 64 << 20) -> None:
        self.budget_bytes = budget_bytes
        self._cond = threading.Condition()
        self._pending: dict[Path, tuple[np.ndarray, Callable[[OSError], None]]] = {}
        self._pending_bytes = 0
        self._writing: Path | None = None
        self._thread: threading.Thread | None = None
        self.finished = 0  # saves done, written or failed (tests)
        self.replaced = 0  # saves dropped because a newer one of the same file came first

    def save(self, path: Path, arr: np.ndarray, on_error: Callable[[OSError], None]) -> None:
        """Queue arr to be written to path (replacing a save of path still waiting); on_error is told if the
        write fails (on the writer thread)."""
        with self._cond:
            old = self._pending.pop(path, None)
            if old is not None:
                self._pending_bytes -= old[0].nbytes
                self.replaced += 1
            self._cond.wait_for(lambda: not self._pending or self._pending_bytes + arr.nbytes <= self.budget_bytes)
            self._pending[path] = (arr, on_error)
            self._pending_bytes += arr.nbytes
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_all, name="npy-saver", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def save_now(self, path: Path, arr: np.ndarray) -> None:
        """Write arr to path on this thread, after dropping a waiting save of path and waiting for one being
        written (so an older array never lands after this one). Raises OSError."""
        with self._cond:
            old = self._pending.pop(path, None)
            if old is not None:
                self._pending_bytes -= old[0].nbytes
                self.replaced += 1
                self._cond.notify_all()
            self._cond.wait_for(lambda: self._writing != path)
        overwrite_npy(path, arr)

    def flush(self, path: Path | None = None, timeout_s: float | None = None) -> bool:
        """Wait until the save of path (of every file, without path) is written; False on timeout."""
        with self._cond:
            if path is None:
                return self._cond.wait_for(lambda: not self._pending and self._writing is None, timeout_s)
            return self._cond.wait_for(lambda: path not in self._pending and self._writing != path, timeout_s)

    @property
    def pending_bytes(self) -> int:
        """Bytes of the arrays waiting (not counting the one being written)."""
        with self._cond:
            return self._pending_bytes

    def _write_all(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending))
                path = next(iter(self._pending))  # the oldest waiting file first
                arr, on_error = self._pending.pop(path)
                self._pending_bytes -= arr.nbytes
                self._writing = path
                self._cond.notify_all()  # room for a save() waiting on the budget
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                overwrite_npy(path, arr)
            except OSError as e:
                on_error(e)
            except Exception as e:  # a bug must not stop every later save of the process
                on_error(OSError(f"{type(e).__name__}: {e}"))
            finally:
                del arr
                with self._cond:
                    self._writing = None
                    self.finished += 1
                    self._cond.notify_all()


_shared: NpySaver | None = None
_shared_lock = threading.Lock()


def shared_saver() -> NpySaver:
    """The process's NpySaver (one writer thread for every site of a process)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = NpySaver()
        return _shared
