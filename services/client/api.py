"""What a job's custom code (app/custom/*.py) may import: the executor interface and DXO.

A custom executor subclasses Executor, takes its config args as keyword arguments,
and returns a DXO from execute(); raising TaskError(rc, text) reports a failure. For a job
whose aggregator expects a dict of kinds (NVFlare's collection mode) it returns
``collection({key: DXO(...)})``, a DXO of kind COLLECTION.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from sagmq.wire.codec import COLLECTION, DXO, METRICS, WEIGHT_DIFF, WEIGHTS, collection
from sagmq.wire.messages import (
    RC_BAD_TASK_DATA,
    RC_EXECUTION_EXCEPTION,
    RC_EXECUTION_RESULT_ERROR,
    RC_TASK_ABORTED,
    RC_TASK_UNKNOWN,
)

__all__ = [
    "DXO", "WEIGHTS", "WEIGHT_DIFF", "METRICS", "COLLECTION", "collection", "Executor", "TaskContext", "TaskError",
    "RC_BAD_TASK_DATA", "RC_EXECUTION_EXCEPTION", "RC_EXECUTION_RESULT_ERROR", "RC_TASK_ABORTED", "RC_TASK_UNKNOWN",
    "NUM_STEPS_CURRENT_ROUND",
]

NUM_STEPS_CURRENT_ROUND = "NUM_STEPS_CURRENT_ROUND"


class TaskError(Exception):
    """An executor's failure, reported to the server with an NVFlare return code."""

    def __init__(self, rc: str, text: str) -> None:
        super().__init__(text)
        self.rc = rc
        self.text = text


@dataclass(slots=True)
class TaskContext:
    """What an executor knows about the task it runs."""

    site: str
    job_id: str
    round: int
    num_rounds: int
    task_name: str
    workdir: Path
    abort: threading.Event = field(default_factory=threading.Event)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("sagmq.executor"))

    def aborted(self) -> bool:
        """True once the job was aborted or the round moved on."""
        return self.abort.is_set()


class Executor:
    """Base class of executors; one instance serves a job's tasks on one site."""

    def execute(self, task_name: str, dxo: DXO, ctx: TaskContext) -> DXO:  # pragma: no cover - interface
        """Run one task on the global model in dxo and return the site's result."""
        raise NotImplementedError

    def quick(self, task_name: str, dxo: DXO) -> bool:
        """Whether this task takes well under a millisecond or so, never waits and never blocks: the
        site then runs it on its I/O thread, without the hand-offs to and from its worker thread (a
        good part of a small round). The default, False, is right for any real training."""
        return False
