"""NPValidator as NVFlare's hello-numpy-cross-val defines it (nvflare.app_common.np.np_validator).

A dummy validation: the accuracy of a model is the sum of its ``numpy_key`` array divided by that
array's maximum, plus a random number in [0, 1) (NVFlare draws it with np.random.random(); its
``epsilon`` argument is accepted and, as there, unused). The answer is a METRICS DXO
``{"accuracy": v}``; the value travels as a 0-d float64 array (the wire's DXO carries arrays) and is
a plain number again in cross_val_results.json.
"""

from __future__ import annotations

import numpy as np

from sagmq.client.api import (
    DXO,
    METRICS,
    RC_BAD_TASK_DATA,
    RC_TASK_ABORTED,
    RC_TASK_UNKNOWN,
    WEIGHTS,
    Executor,
    TaskContext,
    TaskError,
)

NUMPY_KEY = "numpy_key"
MODEL_OWNER = "model_owner"


def dummy_accuracy(weights: np.ndarray, epsilon: float) -> float:
    """NVFlare's NPValidator's number: sum(w / max(w)) + epsilon."""
    w = np.asarray(weights)
    return float(np.sum(w / np.max(w)) + epsilon)


class NPValidator(Executor):
    """Validates a model sent in a validate task and returns METRICS {"accuracy": v}."""

    def __init__(self, epsilon: float = 1, sleep_time: float = 0, validate_task_name: str = "validate") -> None:
        self.epsilon = epsilon  # (unused, as in NVFlare: the epsilon added is random)
        self.sleep_time = sleep_time
        self.validate_task_name = validate_task_name
        self.rng = np.random.default_rng()

    def execute(self, task_name: str, dxo: DXO, ctx: TaskContext) -> DXO:
        """Validate on the validate task; anything else is unknown."""
        if ctx.abort.wait(float(self.sleep_time)) if self.sleep_time else ctx.aborted():
            raise TaskError(RC_TASK_ABORTED, "aborted before validating")
        if task_name != self.validate_task_name:
            raise TaskError(RC_TASK_UNKNOWN, f"NPValidator does not serve task {task_name!r}")
        if dxo.kind != WEIGHTS or not dxo.data:
            raise TaskError(RC_BAD_TASK_DATA, f"expected a WEIGHTS DXO with data, got {dxo.kind} "
                                              f"with {len(dxo.data)} variable(s)")
        if NUMPY_KEY not in dxo.data:
            raise TaskError(RC_BAD_TASK_DATA, f"{NUMPY_KEY} is not in the model: cannot validate")
        owner = str(dxo.meta.get(MODEL_OWNER, "?"))
        epsilon = float(self.rng.random())
        accuracy = dummy_accuracy(dxo.data[NUMPY_KEY], epsilon)
        ctx.log.info("site %s validated the model of %s: accuracy %.6g (random epsilon %.6g)", ctx.site, owner,
                     accuracy, epsilon)
        return DXO(METRICS, {"accuracy": np.array(accuracy, dtype=np.float64)})

    def quick(self, task_name: str, dxo: DXO) -> bool:
        """A small model with no sleep: a sum and a division, microseconds."""
        return (task_name == self.validate_task_name and float(self.sleep_time) <= 0
                and dxo.nbytes() <= 256 << 10)
