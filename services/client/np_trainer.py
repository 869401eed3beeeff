"""NPTrainer as NVFlare defines it (nvflare.app_common.np.np_trainer): add delta to every weight, report one step."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from sagmq.client.api import (
    DXO,
    NUM_STEPS_CURRENT_ROUND,
    RC_BAD_TASK_DATA,
    RC_EXECUTION_RESULT_ERROR,
    RC_TASK_ABORTED,
    RC_TASK_UNKNOWN,
    WEIGHTS,
    Executor,
    TaskContext,
    TaskError,
)
from sagmq.storage.files import NpySaver, shared_saver

BACKGROUND_SAVE_BYTES = 1 << 20  # local models from this size on are saved by the process's writer thread
QUICK_BYTES = 256 << 10  # with no sleep_time, a model up to this size is trained on the site's I/O thread


class NPTrainer(Executor):
    """Returns WEIGHTS = global + delta, after sleep_time seconds (checking abort)."""

    def __init__(
        self,
        delta: float = 1,
        sleep_time: float = 0,
        train_task_name: str = "train",
        submit_model_task_name: str = "submit_model",
        model_name: str = "best_numpy.npy",
        model_dir: str = "model",
        **_: Any,
    ) -> None:
        self.delta = delta
        self.sleep_time = sleep_time
        self.train_task_name = train_task_name
        self.submit_model_task_name = submit_model_task_name
        self.model_name = model_name
        self.model_dir = model_dir
        self.saver: NpySaver = shared_saver()  # one writer for every site of the process
        self._saved: Path | None = None  # the file of the last local save

    def execute(self, task_name: str, dxo: DXO, ctx: TaskContext) -> DXO:
        """Train (add delta) on the train task, return the local model on the submit_model task (cross-site
        evaluation); anything else is unknown."""
        if task_name == self.submit_model_task_name and task_name != self.train_task_name:
            return self._submit_model(ctx)
        if task_name != self.train_task_name:
            raise TaskError(RC_TASK_UNKNOWN, f"NPTrainer does not serve task {task_name!r}")
        if dxo.kind != WEIGHTS:
            raise TaskError(RC_BAD_TASK_DATA, f"expected a WEIGHTS DXO, got {dxo.kind}")
        if not dxo.data:
            raise TaskError(RC_BAD_TASK_DATA, "the task carries no weights")
        deadline = time.monotonic() + float(self.sleep_time)
        while time.monotonic() < deadline:
            if ctx.abort.wait(min(0.5, max(0.0, deadline - time.monotonic()))):
                raise TaskError(RC_TASK_ABORTED, "aborted while training")
        if ctx.aborted():
            raise TaskError(RC_TASK_ABORTED, "aborted before training")
        out = {k: v + np.asarray(self.delta).astype(v.dtype) if v.dtype.kind == "f" else v + self.delta
               for k, v in dxo.data.items()}
        if "numpy_key" in out:
            self._save_local(ctx, ctx.workdir / self.model_dir / self.model_name, out["numpy_key"])
        return DXO(WEIGHTS, out, {NUM_STEPS_CURRENT_ROUND: 1})

    def _submit_model(self, ctx: TaskContext) -> DXO:
        """The local model saved by the last training (NVFlare's NPTrainer: EXECUTION_RESULT_ERROR without one)."""
        path = ctx.workdir / self.model_dir / self.model_name
        self.saver.flush(path)  # a save of it still waiting for the writer: read the newest model, whole
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise TaskError(RC_EXECUTION_RESULT_ERROR, f"local model not found: {e}") from e
        if ctx.aborted():
            raise TaskError(RC_TASK_ABORTED, "aborted while submitting the model")
        return DXO(WEIGHTS, {"numpy_key": arr})

    def quick(self, task_name: str, dxo: DXO) -> bool:
        """Adding delta to a small model, with no sleep: microseconds, plus a small file write."""
        return (task_name == self.train_task_name and float(self.sleep_time) <= 0
                and sum(v.nbytes for v in dxo.data.values()) <= QUICK_BYTES)

    def _save_local(self, ctx: TaskContext, path: Path, arr: np.ndarray) -> None:
        """Save the local model as NVFlare's NPTrainer does. A large one goes to the process's writer thread,
        so the result does not wait for the disk (the array is never changed afterwards): at most one save
        per file waits there, a newer one replacing it, and the arrays waiting are bounded in bytes
        (sagmq.storage.files.NpySaver). A small one is written at once (cheaper than a hand-over)."""
        self._saved = path

        def failed(e: OSError) -> None:  # NVFlare only logs a failed local save
            ctx.log.warning("could not save the local model: %s", e)

        if arr.nbytes >= BACKGROUND_SAVE_BYTES:
            self.saver.save(path, arr, failed)
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.saver.save_now(path, arr)
        except OSError as e:
            failed(e)

    def wait_saved(self) -> None:
        """Wait for the last local save to be written (cross-site evaluation reads the file next)."""
        if self._saved is not None:
            self.saver.flush(self._saved)
