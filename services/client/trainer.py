"""NPTrainer as NVFlare defines it: add delta to every weight, report one step."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from services.client.api import (
    NUM_STEPS_CURRENT_ROUND,
    RC_BAD_TASK_DATA,
    RC_TASK_ABORTED,
    RC_TASK_UNKNOWN,
    DXO,
    WEIGHTS,
    Executor,
    TaskContext,
    TaskError,
)


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
        self.model_name = model_name
        self.model_dir = model_dir

    def execute(self, task_name: str, dxo: DXO, ctx: TaskContext) -> DXO:
        """Train (add delta) on the train task; anything else is unknown."""
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
        try:
            path = ctx.workdir / self.model_dir / self.model_name
            path.parent.mkdir(parents=True, exist_ok=True)
            if "numpy_key" in out:
                np.save(path, out["numpy_key"])
        except OSError as e:  # NVFlare only logs a failed local save
            ctx.log.warning("could not save the local model: %s", e)
        return DXO(WEIGHTS, out, {NUM_STEPS_CURRENT_ROUND: 1})
