"""A job's own trainer: adds delta to every weight and reports num_steps local steps.

It returns WEIGHTS (the updated model) or, with kind="WEIGHT_DIFF", only the change.
It shows what a job's custom code looks like: a subclass of the site's Executor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sagmq.client.api import (
    DXO,
    NUM_STEPS_CURRENT_ROUND,
    RC_BAD_TASK_DATA,
    RC_TASK_ABORTED,
    WEIGHT_DIFF,
    WEIGHTS,
    Executor,
    TaskContext,
    TaskError,
)


class NPTrainer(Executor):
    """Train by adding delta; weight the result by num_steps."""

    def __init__(self, delta: float = 1.0, num_steps: int = 1, kind: str = WEIGHTS, sleep_time: float = 0.0,
                 **_: Any) -> None:
        if kind not in (WEIGHTS, WEIGHT_DIFF):
            raise ValueError(f"kind must be WEIGHTS or WEIGHT_DIFF, got {kind!r}")
        self.delta = float(delta)
        self.num_steps = num_steps
        self.kind = kind
        self.sleep_time = float(sleep_time)

    def execute(self, task_name: str, dxo: DXO, ctx: TaskContext) -> DXO:
        if dxo.kind != WEIGHTS or not dxo.data:
            raise TaskError(RC_BAD_TASK_DATA, "expected the global model as WEIGHTS")
        if ctx.abort.wait(self.sleep_time):
            raise TaskError(RC_TASK_ABORTED, "aborted")
        if self.kind == WEIGHT_DIFF:
            out = {k: np.full_like(v, self.delta) for k, v in dxo.data.items()}
        else:
            out = {k: v + v.dtype.type(self.delta) for k, v in dxo.data.items()}
        return DXO(self.kind, out, {NUM_STEPS_CURRENT_ROUND: self.num_steps})
