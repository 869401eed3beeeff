"""NPModelPersistor: one job's numpy model on disk, with a snapshot per round and the job's history.

NVFlare's component of that name, for one job, in its folder of the persistor's workspace.
Every file is written to a temporary name, fsynced and renamed, so a reader never sees a
half-written model::

    jobs/<job_id>/<model_dir>/<model_name>     the latest global model (models/server.npy)
    jobs/<job_id>/<model_dir>/round-<r>.npy    the global model after round r

The file name says its format, as NPModelPersistor would load it: a model of one array
(``numpy_key``) is a ``.npy``; a model of several arrays is a ``.npz`` (model_name with its
extension replaced: ``server.npz``), and so is its round's snapshot. A model that changes from
one to several arrays leaves no stale file of the other format behind.
    jobs/<job_id>/meta.json, history.json      the job's meta and round history

A round's snapshot is a hard link to the file the model was written as, so the last saved
round is the snapshot that is still the same file as the model: no progress file to write
(and fsync) each round, and no moment at which the two could disagree.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeGuard

import numpy as np

from sagmq.storage.files import atomic_write, atomic_write_with, write_npy
from sagmq.wire.errors import SagmqError

NUMPY_KEY = "numpy_key"
DEFAULT_MODEL = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
HISTORY_EVERY_S = 1.0  # history.json is rewritten at most this often while a job runs (and at its end)
SNAPSHOT = re.compile(r"round-(\d+)\.np[yz]")


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A job's starting model and where it came from (saved, checkpoint, config or default)."""

    weights: dict[str, np.ndarray]
    source: str
    last_round: int | None  # the round it was saved after, for a saved model


def write_model(f: BinaryIO, weights: dict[str, np.ndarray], npz: bool) -> None:
    """A model as .npy (one variable) or .npz (several), straight from the arrays; never pickled."""
    if npz:
        arrays: dict[str, Any] = dict(weights)  # (numpy's stubs would read a variable as allow_pickle)
        np.savez(f, **arrays)
    else:
        (arr,) = weights.values()
        write_npy(f, arr)


def model_file_name(model_name: str, npz: bool) -> str:
    """The file a model is saved as: model_name with the extension of its format (.npz: several arrays)."""
    stem = model_name[:-4] if model_name.endswith((".npy", ".npz")) else model_name
    return stem + (".npz" if npz else ".npy")


def is_npz(weights: Mapping[str, np.ndarray]) -> bool:
    """Whether a model is saved as .npz: anything but one array named numpy_key."""
    return not (len(weights) == 1 and NUMPY_KEY in weights)


def read_model(path: Path) -> dict[str, np.ndarray]:
    """A .npy (as numpy_key) or .npz model, never unpickled."""
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            return {k: loaded[k] for k in loaded.files}
    return {NUMPY_KEY: loaded}


def history_json(records: list[dict[str, Any]]) -> bytes:
    """history.json's bytes: a JSON array with one round record per line. (json.dumps with indent runs in
    pure Python, about ten times slower than without: with thousands of rounds, rewriting the file once a
    second took a third of the persistor's CPU.)"""
    lines = ",\n".join(json.dumps(h, separators=(", ", ": "), default=str) for h in records)
    return f"[\n{lines}\n]\n".encode() if records else b"[]\n"


class NPModelPersistor:
    """One job's model files, with NVFlare's arguments (model_dir and model_name say where the model is
    saved; model, or source_ckpt_file_full_name, what it starts from when nothing is saved yet)."""

    def __init__(
        self,
        job_dir: Path,
        model_dir: str = "models",
        model_name: str = "server.npy",
        model: list[Any] | None = None,
        source_ckpt_file_full_name: str = "",
    ) -> None:
        self.job_dir = job_dir
        self.model_dir = model_dir
        self.model_name = model_name
        self.model = model
        self.source_ckpt_file_full_name = source_ckpt_file_full_name
        self._last: tuple[int, str, str] | None = None
        self._last_known = False  # _last was found on disk (once) or set by a save
        self._history: dict[Any, dict[str, Any]] | None = None  # history.json in memory, by round
        self._history_written = -HISTORY_EVERY_S
        self._dirty = False

    @property
    def model_path(self) -> Path:
        """Where a one-array model is saved (a model of several arrays goes to its .npz: model_file)."""
        return self.job_dir / self.model_dir / model_file_name(self.model_name, False)

    def model_file(self, weights: Mapping[str, np.ndarray]) -> Path:
        """Where this model is saved: .npy for one array, .npz for several."""
        return self.job_dir / self.model_dir / model_file_name(self.model_name, is_npz(weights))

    def _resume_point(self, n: int) -> tuple[int, Path] | None:
        """(round, file) a resumed job starts after: the last save (n = 1), the last saved round that was
        snapshot-due (its snapshot file, which keeps that round's model after later saves replaced the
        model file), or none (n = 0, or no due round saved yet)."""
        last = self.last_saved()
        if last is None or n == 0:
            return None
        if n == 1:
            saved = self._saved_file()
            return None if saved is None else (last[0], saved)
        folder = self.job_dir / last[1]
        due = [(int(m.group(1)), folder / m.group(0)) for m in (SNAPSHOT.fullmatch(p.name) for p in folder.iterdir())
               if m is not None and int(m.group(1)) <= last[0] and (int(m.group(1)) + 1) % n == 0]
        return max(due) if due else None

    def _saved_file(self) -> Path | None:
        """The file of the job's last save (its snapshot's twin), if it is still there."""
        last = self.last_saved()
        if last is None:
            return None
        path = self.job_dir / last[1] / last[2]
        return path if path.is_file() else None

    # --- the model --------------------------------------------------------------------------

    def last_round(self) -> int | None:
        """The last round saved for the job, if any."""
        last = self.last_saved()
        return None if last is None else last[0]

    def last_saved(self) -> tuple[int, str, str] | None:
        """(round, model_dir, model_name) of the job's last save, if any: its snapshot is the file
        the model name still points at (a crash between linking a new snapshot and renaming the
        model over the old one leaves the old pair, which is what was saved)."""
        if not self._last_known:
            self._last, self._last_known = _find_last(self.job_dir), True
        return self._last

    def load(self, snapshot_every_n_rounds: int = 1) -> LoadedModel:
        """The job's saved model to resume from, if any (ScatterAndGather's snapshot_every_n_rounds: the last
        saved round r with (r + 1) % n == 0, from its snapshot; n = 0: none); else the source checkpoint, the
        configured list, or NVFlare's default."""
        resume = self._resume_point(snapshot_every_n_rounds)
        if resume is not None:
            return LoadedModel(read_model(resume[1]), "saved", resume[0])
        if self.source_ckpt_file_full_name:
            src = Path(self.source_ckpt_file_full_name)
            if not src.is_file():
                raise SagmqError(f"source_ckpt_file_full_name {self.source_ckpt_file_full_name!r} "
                                 f"does not exist on the persistor")
            return LoadedModel(read_model(src), "checkpoint", None)
        if self.model is not None:
            try:
                arr = np.asarray(self.model, dtype=np.float32)
            except (TypeError, ValueError) as e:
                raise SagmqError(f"NPModelPersistor model is not numeric: {e}") from e
            return LoadedModel({NUMPY_KEY: arr}, "config", None)
        return LoadedModel({NUMPY_KEY: np.array(DEFAULT_MODEL, dtype=np.float32)}, "default", None)

    def save(self, rnd: int, weights: dict[str, np.ndarray]) -> Path:
        """Save a round's model: one durable write, as the model file and its round's snapshot."""
        npz = is_npz(weights)
        path = self.model_file(weights)
        ext = ".npz" if npz else ".npy"
        atomic_write_with(path, lambda f: write_model(f, weights, npz), also=path.parent / f"round-{rnd}{ext}")
        other = path.with_name(model_file_name(self.model_name, not npz))
        if other != path:  # the model changed format: the old file would be a stale model under another name
            other.unlink(missing_ok=True)
        self._last, self._last_known = (rnd, self.model_dir, path.name), True
        return path

    # --- meta and history -------------------------------------------------------------------

    def write_json(self, name: str, obj: Any) -> None:
        """meta.json of the job (history.json is written by flush_history, one record per line)."""
        atomic_write(self.job_dir / name, json.dumps(obj, indent=2, default=str).encode())

    def merge_history(self, records: Iterable[Any], at_once: bool = False) -> None:
        """Merge round records (maps; anything else is skipped) into the job's history, by round: a record
        replaces its round's only if it supersedes it (see supersedes), so a stale or shorter copy (a
        restarted server's) never removes or downgrades a round. history.json is rewritten at once if at_once (a job's end) or if it was
        not in the last HISTORY_EVERY_S, else by flush_history: a job of many short rounds does not
        rewrite a growing file every round."""
        by_round = self._records()
        for h in records:
            if not isinstance(h, dict):
                continue
            old = by_round.get(h.get("round"))
            if old is None or supersedes(h, old):
                by_round[h.get("round")] = h
        self._dirty = True
        if at_once or time.monotonic() - self._history_written >= HISTORY_EVERY_S:
            self.flush_history()

    def history(self) -> list[dict[str, Any]]:
        """The job's round records, by round (what history.json holds, or will at the next flush)."""
        return sorted(self._records().values(), key=lambda h: (h.get("round") is None, h.get("round") or 0))

    def _records(self) -> dict[Any, dict[str, Any]]:
        if self._history is None:
            self._history = {h.get("round"): h for h in self._read_history()}
        return self._history

    def _read_history(self) -> list[dict[str, Any]]:
        path = self.job_dir / "history.json"
        try:
            old = json.loads(path.read_text()) if path.exists() else []
        except (OSError, ValueError):
            old = []  # a damaged file is rewritten from what comes next (the job's end sends it whole)
        return [h for h in old if isinstance(h, dict)] if isinstance(old, list) else []

    def flush_history(self) -> None:
        """Write history.json if records came since it was written."""
        if not self._dirty or self._history is None:
            return
        self._dirty = False
        merged = sorted(self._history.values(), key=lambda h: (h.get("round") is None, h.get("round") or 0))
        atomic_write(self.job_dir / "history.json", history_json(merged))
        self._history_written = time.monotonic()

    def files(self) -> dict[str, bytes]:
        """Every file of the job, for download."""
        self.flush_history()
        if not self.job_dir.is_dir():
            raise SagmqError(f"the persistor has nothing for job {self.job_dir.name}")
        return {
            p.relative_to(self.job_dir).as_posix(): p.read_bytes()
            for p in sorted(self.job_dir.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        }


def supersedes(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Whether a round's record `new` should replace `old`: it records a later run of the round (another
    task that started later: a resumed job ran an unsaved round again), or the same run at least as
    completely (as many known keys: a record sent with a round's save lacks done_at and saved_at, which
    the job's end brings; the persistor's own note of a round has fewer keys than the server's record)."""
    t_new, t_old = new.get("started_at"), old.get("started_at")
    if new.get("task_id") != old.get("task_id") and _is_time(t_new) and _is_time(t_old):
        return t_new >= t_old
    return _known(new) >= _known(old)


def _is_time(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _known(record: dict[str, Any]) -> int:
    return sum(v is not None for v in record.values())


def _find_last(root: Path) -> tuple[int, str, str] | None:
    """The highest round whose snapshot is still the same file as a model beside it."""
    best: tuple[int, str, str] | None = None
    if not root.is_dir():
        return None
    for folder in {p.parent for p in root.rglob("round-*.np?")}:
        models: dict[tuple[int, int], str] = {}
        snaps: list[tuple[int, tuple[int, int]]] = []
        for e in os.scandir(folder):
            if not e.is_file(follow_symlinks=False) or e.name.startswith("."):
                continue
            st = e.stat(follow_symlinks=False)
            m = SNAPSHOT.fullmatch(e.name)
            if m:
                snaps.append((int(m.group(1)), (st.st_dev, st.st_ino)))
            else:
                models[(st.st_dev, st.st_ino)] = e.name
        for rnd, ino in snaps:
            if ino in models and (best is None or rnd > best[0]):
                best = (rnd, folder.relative_to(root).as_posix(), models[ino])
    return best
