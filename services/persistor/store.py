"""NPModelPersistor's store: jobs/<job_id>/models/server.npy plus per-round snapshots.

Every file is written to a temporary name, fsynced and renamed, so a reader never sees
a half-written model. Layout under the persistor's workspace::

    jobs/<job_id>/models/server.npy        the latest global model (NVFlare's file)
    jobs/<job_id>/models/round-<r>.npy     the global model after round r
    jobs/<job_id>/meta.json, history.json  the job's meta and round history

A round's snapshot is a hard link to the file the model was written as, so the last saved
round is the snapshot that is still the same file as the model: no progress file to write
(and fsync) each round, and no moment at which the two could disagree.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from sagmq.storage.files import atomic_write, atomic_write_with, write_npy
from sagmq.wire.errors import SagmqError
from sagmq.wire.settings import check_name

NUMPY_KEY = "numpy_key"
DEFAULT_MODEL = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
HISTORY_EVERY_S = 1.0  # history.json is rewritten at most this often while a job runs (and at its end)
SNAPSHOT = re.compile(r"round-(\d+)\.np[yz]")


def write_model(f: BinaryIO, weights: dict[str, np.ndarray], npz: bool) -> None:
    """A model as .npy (one variable) or .npz (several), straight from the arrays; never pickled."""
    if npz:
        np.savez(f, **weights)
    else:
        (arr,) = weights.values()
        write_npy(f, arr)


class ModelStore:
    """The persistor's files for every job."""

    def __init__(self, workspace: Path) -> None:
        self.root = workspace / "persistor" / "jobs"
        # job -> (last round saved, model_dir, model_name), found on disk once
        self._last: dict[str, tuple[int, str, str] | None] = {}
        # job -> round -> record: history.json in memory, written at most every HISTORY_EVERY_S
        self._history: dict[str, dict[Any, dict[str, Any]]] = {}
        self._history_written: dict[str, float] = {}
        self._dirty: set[str] = set()

    def job_dir(self, job_id: str) -> Path:
        return self.root / check_name("job id", job_id)

    def _model_path(self, job_id: str, model_dir: str, model_name: str) -> Path:
        return self.job_dir(job_id) / model_dir / model_name

    def last_round(self, job_id: str) -> int | None:
        """The last round saved for a job, if any."""
        last = self.last_saved(job_id)
        return None if last is None else last[0]

    def last_saved(self, job_id: str) -> tuple[int, str, str] | None:
        """(round, model_dir, model_name) of the job's last save, if any: its snapshot is the file
        the model name still points at (a crash between linking a new snapshot and renaming the
        model over the old one leaves the old pair, which is what was saved)."""
        if job_id not in self._last:
            self._last[job_id] = self._find_last(self.job_dir(job_id))
        return self._last[job_id]

    @staticmethod
    def _find_last(root: Path) -> tuple[int, str, str] | None:
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

    def load(
        self, job_id: str, model_dir: str, model_name: str, initial: list[Any] | None, source: str = ""
    ) -> tuple[dict[str, np.ndarray], str, int | None]:
        """The job's saved model if any; else the source checkpoint, the configured list, or NVFlare's default."""
        path = self._model_path(job_id, model_dir, model_name)
        last = self.last_round(job_id)
        if path.exists() and last is not None:
            loaded = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    return {k: loaded[k] for k in loaded.files}, "saved", last
            return {NUMPY_KEY: loaded}, "saved", last
        if source:
            src = Path(source)
            if not src.is_file():
                raise SagmqError(f"source_ckpt_file_full_name {source!r} does not exist on the persistor")
            loaded = np.load(src, allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    return {k: loaded[k] for k in loaded.files}, "checkpoint", None
            return {NUMPY_KEY: loaded}, "checkpoint", None
        if initial is not None:
            try:
                arr = np.asarray(initial, dtype=np.float32)
            except (TypeError, ValueError) as e:
                raise SagmqError(f"NPModelPersistor model is not numeric: {e}") from e
            return {NUMPY_KEY: arr}, "config", None
        return {NUMPY_KEY: np.array(DEFAULT_MODEL, dtype=np.float32)}, "default", None

    def save(self, job_id: str, rnd: int, weights: dict[str, np.ndarray], model_dir: str, model_name: str) -> Path:
        """Save a round's model: one durable write, as the model file and its round's snapshot."""
        npz = not (len(weights) == 1 and NUMPY_KEY in weights)
        path = self._model_path(job_id, model_dir, model_name)
        ext = ".npz" if npz else ".npy"
        atomic_write_with(path, lambda f: write_model(f, weights, npz), also=path.parent / f"round-{rnd}{ext}")
        self._last[job_id] = (rnd, model_dir, model_name)
        return path

    def write_json(self, job_id: str, name: str, obj: Any) -> None:
        """meta.json or history.json of a job."""
        atomic_write(self.job_dir(job_id) / name, json.dumps(obj, indent=2, default=str).encode())

    def merge_history(self, job_id: str, records: list[dict[str, Any]]) -> None:
        """Merge round records into the job's history (a record replaces the one of the same round).
        history.json is rewritten at once if it was not in the last HISTORY_EVERY_S, else by
        flush_history: a job of many short rounds does not rewrite a growing file every round."""
        by_round = self._history.get(job_id)
        if by_round is None:
            path = self.job_dir(job_id) / "history.json"
            try:
                old = json.loads(path.read_text()) if path.exists() else []
            except (OSError, ValueError):
                old = []  # a damaged file is rewritten from what comes next (the job's end sends it whole)
            by_round = self._history[job_id] = {h.get("round"): h for h in old if isinstance(h, dict)}
        for h in records:
            by_round[h.get("round")] = h
        self._dirty.add(job_id)
        if time.monotonic() - self._history_written.get(job_id, -HISTORY_EVERY_S) >= HISTORY_EVERY_S:
            self.flush_history(job_id)

    def replace_history(self, job_id: str, records: list[dict[str, Any]]) -> None:
        """The job's whole history (sent with its end): written at once."""
        self._history[job_id] = {h.get("round"): h for h in records if isinstance(h, dict)}
        self._dirty.add(job_id)
        self.flush_history(job_id)

    def flush_history(self, job_id: str | None = None) -> None:
        """Write history.json of this job (or of every job) if records came since it was written."""
        for job in [job_id] if job_id is not None else sorted(self._dirty):
            if job not in self._dirty:
                continue
            self._dirty.discard(job)
            merged = sorted(self._history[job].values(), key=lambda h: (h.get("round") is None, h.get("round") or 0))
            self.write_json(job, "history.json", merged)
            self._history_written[job] = time.monotonic()

    def files(self, job_id: str) -> dict[str, bytes]:
        """Every file of a job, for download."""
        root = self.job_dir(job_id)
        self.flush_history(job_id)
        if not root.is_dir():
            raise SagmqError(f"the persistor has nothing for job {job_id}")
        return {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        }
