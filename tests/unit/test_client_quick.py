"""A site runs a task its executor calls quick on the I/O thread, and sends its result at once;
anything else goes to the worker thread, in order (pure logic, on a recording stand-in for the bus;
tests/e2e runs hello-numpy-sag, whose small rounds take this path, through the broker)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sagmq.client.api import DXO, WEIGHTS, Executor, TaskContext
from sagmq.client.apps import App
from sagmq.client.main import ClientService
from sagmq.client.np_trainer import QUICK_BYTES, NPTrainer
from sagmq.wire.messages import TaskResult, TrainTask
from sagmq.wire.settings import Settings
from sagmq.wire.topology import Names

JOB = "c" * 32


class RecordingBus:
    def __init__(self) -> None:
        self.names = Names("t")
        self.on_reconnect: list[Any] = []
        self.sent: list[Any] = []

    def send(self, exchange: str, rk: str, msg: Any, **kw: Any) -> None:
        self.sent.append(msg)

    def call_threadsafe(self, fn: Any) -> None:
        pass


class Adder(Executor):
    def __init__(self, quick: Any = True) -> None:
        self._quick = quick
        self.threads: list[str] = []

    def quick(self, task_name: str, dxo: DXO) -> bool:
        if isinstance(self._quick, Exception):
            raise self._quick
        return bool(self._quick)

    def execute(self, task_name: str, dxo: DXO, ctx: TaskContext) -> DXO:
        self.threads.append(threading.current_thread().name)
        return DXO(WEIGHTS, {k: v + 1 for k, v in dxo.data.items()})


def task(rnd: int) -> TrainTask:
    return TrainTask(JOB, rnd, 9, 0, "train", f"task-{rnd}", ["site-1"],
                     DXO(WEIGHTS, {"w": np.zeros(3, np.float32)}), {}, {})


def site(tmp_path: Path, executor: Executor) -> tuple[ClientService, RecordingBus]:
    bus = RecordingBus()
    svc = ClientService(Settings(site="site-1", workspace=tmp_path), bus)  # type: ignore[arg-type]
    svc.state.apps[JOB] = App("app", tmp_path, {"train": executor})
    return svc, bus


def test_a_quick_task_runs_here_and_its_result_goes_at_once(tmp_path: Path) -> None:
    ex = Adder(quick=True)
    svc, bus = site(tmp_path, ex)
    svc.on_task(task(0))
    assert svc.work.empty() and ex.threads == [threading.current_thread().name]
    (r,) = bus.sent
    assert isinstance(r, TaskResult) and (r.round, r.rc) == (0, "OK") and r.dxo is not None
    assert r.dxo.data["w"].tolist() == [1, 1, 1]
    assert svc.state.current is None


@pytest.mark.parametrize("quick", [False, RuntimeError("broken quick()")], ids=["not-quick", "quick-raises"])
def test_other_tasks_go_to_the_worker(tmp_path: Path, quick: Any) -> None:
    svc, bus = site(tmp_path, Adder(quick=quick))
    svc.on_task(task(0))
    assert bus.sent == [] and svc.work.qsize() == 1 and svc.state.queued == 1


def test_a_quick_task_waits_behind_the_workers_tasks(tmp_path: Path) -> None:
    ex = Adder(quick=True)
    svc, bus = site(tmp_path, ex)
    with svc.state.lock:
        svc.state.queued = 1  # the worker has a task of its own, not finished yet
    svc.on_task(task(1))
    assert bus.sent == [] and svc.work.qsize() == 1  # in order, after it


def test_np_trainer_is_quick_only_without_sleep_and_for_small_models() -> None:
    small = DXO(WEIGHTS, {"numpy_key": np.zeros((3, 3), np.float32)})
    large = DXO(WEIGHTS, {"numpy_key": np.zeros(QUICK_BYTES // 4 + 1, np.float32)})
    assert NPTrainer().quick("train", small)
    assert not NPTrainer().quick("train", large)
    assert not NPTrainer(sleep_time=0.5).quick("train", small)
    assert not NPTrainer().quick("submit_model", small)


class RefusingBus(RecordingBus):
    """Keeps each send's on_done, so a test can refuse it as the broker's last nack would."""

    def __init__(self) -> None:
        super().__init__()
        self.done: list[Any] = []

    def send(self, exchange: str, rk: str, msg: Any, **kw: Any) -> None:
        self.sent.append(msg)
        self.done.append(kw.get("on_done"))


def test_a_result_the_broker_finally_refused_lets_the_task_run_again_when_it_comes_again(tmp_path: Path) -> None:
    from sagmq.wire.errors import SagmqError

    bus = RefusingBus()
    svc = ClientService(Settings(site="site-1", workspace=tmp_path), bus)  # type: ignore[arg-type]
    svc.state.apps[JOB] = App("app", tmp_path, {"train": Adder(quick=True)})
    svc.on_train_task(task(0))
    svc.on_train_task(task(0))  # a copy while its result is on its way: ignored
    assert len(bus.sent) == 1
    bus.done[0](SagmqError("the broker refused result to 't.results' ('result') (nack) 15 times"))
    svc.on_train_task(task(0))  # the server's resend to a site that owes the round: run again
    assert len(bus.sent) == 2 and all(isinstance(r, TaskResult) for r in bus.sent)
    bus.done[1](None)  # delivered this time: a further copy is ignored again
    svc.on_train_task(task(0))
    assert len(bus.sent) == 2
