"""NPTrainer as NVFlare defines it (nvflare.app_common.np.np_trainer): add delta to every weight, report one step."""

from __future__ import annotations

import threading
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
from sagmq.storage.files import overwrite_npy

BACKGROUND_SAVE_BYTES = 1 << 20  # local models from this size on are saved in a thread
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
        self._saving: threading.Thread | None = None

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
        self.wait_saved()
        path = ctx.workdir / self.model_dir / self.model_name
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
        """Save the local model as NVFlare's NPTrainer does. A large one is written in the background,
        so the result does not wait for the disk (the array is never changed afterwards); a small one
        at once (cheaper than a thread). One save at a time, in order."""
        self.wait_saved()

        def save() -> None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                overwrite_npy(path, arr)
            except OSError as e:  # NVFlare only logs a failed local save
                ctx.log.warning("could not save the local model: %s", e)

        if arr.nbytes < BACKGROUND_SAVE_BYTES:
            save()
            return
        self._saving = threading.Thread(target=save, name="local-save", daemon=True)
        self._saving.start()

    def wait_saved(self) -> None:
        """Wait for the last local save to be written."""
        if self._saving is not None:
            self._saving.join()
            self._saving = None
