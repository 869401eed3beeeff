"""A site's side of a forwarded model: the aggregate it holds, the task that names it, and every
order and failure in between (pure logic, on a recording stand-in for the bus; the broker path
is tested end to end in tests/e2e/test_large.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sagmq.client.main import ClientService
from sagmq.wire.bus import Delivery
from sagmq.wire.codec import DXO, WEIGHTS
from sagmq.wire.errors import Rejected
from sagmq.wire.messages import ClientHeartbeat, Control, Message, RoundAggregated, TrainTask
from sagmq.wire.settings import Settings
from sagmq.wire.topology import Names

JOB = "a" * 32


class RecordingBus:
    """What ClientService uses of a Bus: acks and publishes are recorded."""

    def __init__(self) -> None:
        self.names = Names("t")
        self.on_reconnect: list[Any] = []
        self.acked: list[Delivery] = []
        self.published: list[Any] = []

    def ack(self, d: Delivery) -> None:
        self.acked.append(d)

    def publish(self, exchange: str, rk: str, msg: Any, **kw: Any) -> None:
        self.published.append(msg)

    def call_threadsafe(self, fn: Any) -> None:
        pass  # the I/O thread would publish the outbox: the test looks at the outbox itself


def delivery(msg: Message, user: str = "guest") -> Delivery:
    return Delivery("t.site.site-1", "", "", msg.TYPE, {}, user, "m", None, None, False, b"", 1, 0,
                    payload=msg.to_wire())


def aggregate(task_id: str = "task-0", accepted: tuple[str, ...] = ("site-1", "site-2"),
              value: float = 5.0) -> RoundAggregated:
    return RoundAggregated(JOB, 0, list(accepted), DXO(WEIGHTS, {"w": np.full(4, value, np.float32)},
                                                      {"accepted": list(accepted)}), task_id)


def task(task_id: str = "task-1", model_from: str = "task-0", w: np.ndarray | None = None) -> TrainTask:
    data = {} if w is None else {"w": w}
    return TrainTask(JOB, 1, 3, 0, "train", task_id, ["site-1", "site-2"],
                     DXO(WEIGHTS, data, {"current_round": 1, "num_rounds": 3}), {}, {}, model_from)


@pytest.fixture
def site(tmp_path: Path) -> tuple[ClientService, RecordingBus]:
    bus = RecordingBus()
    svc = ClientService(Settings(site="site-1", workspace=tmp_path), bus)  # type: ignore[arg-type]
    return svc, bus


def queued(svc: ClientService) -> list[TrainTask]:
    out = []
    while not svc.work.empty():
        w = svc.work.get_nowait()
        assert w is not None
        out.append(w.task)
    return out


def test_the_task_takes_the_held_aggregate_as_its_model(site: tuple[ClientService, RecordingBus]) -> None:
    svc, bus = site
    agg = delivery(aggregate())
    svc.on_message(agg)
    assert agg.deferred and bus.acked == []  # held unacked until a task names it
    svc.on_message(delivery(task()))
    (t,) = queued(svc)
    np.testing.assert_array_equal(t.dxo.data["w"], np.full(4, 5.0, np.float32))
    assert t.dxo.meta == {"current_round": 1, "num_rounds": 3}  # the task's meta, not the aggregate's
    assert bus.acked == [agg] and svc.forwarded == {}


def test_a_task_before_its_aggregate_asks_then_runs_when_it_comes(site: tuple[ClientService, RecordingBus]) -> None:
    svc, bus = site
    svc.on_message(delivery(task()))
    assert queued(svc) == []
    (hb,) = bus.published
    assert isinstance(hb, ClientHeartbeat) and hb.missing_model == "task-1"
    svc.on_message(delivery(aggregate()))
    (t,) = queued(svc)
    assert t.task_id == "task-1" and t.dxo.data["w"][0] == 5.0
    svc.beat()
    assert bus.published[-1].missing_model == ""  # nothing waits any more
    # the whole task the server sent meanwhile is the same task: not run twice
    svc.on_message(delivery(task(model_from="", w=np.zeros(4, np.float32))))
    assert queued(svc) == []


def test_a_task_naming_another_aggregate_waits_for_the_whole_task(site: tuple[ClientService, RecordingBus]) -> None:
    svc, bus = site
    svc.on_message(delivery(aggregate(task_id="older")))
    svc.on_message(delivery(task()))
    assert queued(svc) == [] and bus.published[-1].missing_model == "task-1"
    svc.on_message(delivery(task(model_from="", w=np.ones(4, np.float32))))
    (t,) = queued(svc)
    assert t.dxo.data["w"][0] == 1.0
    assert svc.waiting == {} and svc.forwarded == {} and len(bus.acked) == 1  # the stale one let go


def test_a_newer_aggregate_replaces_the_held_one(site: tuple[ClientService, RecordingBus]) -> None:
    svc, bus = site
    first = delivery(aggregate(task_id="task-0", value=1.0))
    svc.on_message(first)
    svc.on_message(delivery(aggregate(task_id="task-0b", value=2.0)))
    assert bus.acked == [first]
    svc.on_message(delivery(task(model_from="task-0b")))
    assert queued(svc)[0].dxo.data["w"][0] == 2.0


def test_abort_lets_the_held_aggregate_go(site: tuple[ClientService, RecordingBus]) -> None:
    svc, bus = site
    agg = delivery(aggregate())
    svc.on_message(agg)
    svc.on_message(delivery(Control("abort", JOB)))
    assert bus.acked == [agg] and svc.forwarded == {}
    svc.on_message(delivery(aggregate()))  # one that comes after the abort is not held
    assert svc.forwarded == {}


@pytest.mark.parametrize("msg,user,reason", [
    (aggregate(), "site-2", "spoofed sender: user 'site-2' forwarded an aggregate"),
    (aggregate(accepted=("site-2",)), "aggregator", "which is not among its contributors"),
    (RoundAggregated(JOB, 0, ["site-1"], None, "task-0"), "aggregator", "carries no WEIGHTS"),
    (aggregate(task_id=""), "aggregator", "or no task id"),
], ids=["spoofed", "not a contributor", "no model", "no task id"])
def test_a_bad_forwarded_aggregate_is_refused_with_its_reason(site: tuple[ClientService, RecordingBus],
                                                              msg: RoundAggregated, user: str, reason: str) -> None:
    svc, _ = site
    with pytest.raises(Rejected) as e:
        svc.on_message(delivery(msg, user=user))
    assert reason in e.value.reason
    assert svc.forwarded == {}


def test_a_reconnect_forgets_held_aggregates(site: tuple[ClientService, RecordingBus]) -> None:
    svc, bus = site
    svc.on_message(delivery(aggregate()))
    for fn in bus.on_reconnect:
        fn()
    assert svc.forwarded == {}  # the broker delivers them again on the new channel


def test_the_next_task_waits_for_the_last_large_result_to_be_confirmed(site: tuple[ClientService, RecordingBus]) -> None:
    """A forwarded model can come while the last large result is still kept for a resend: the task
    waits for that result's confirm, so the site holds two models, not three."""
    import threading
    import time

    from sagmq.wire.messages import TaskResult

    svc, bus = site
    sends: list[Any] = []
    bus.send = lambda *a, on_done=None, **kw: sends.append(on_done)  # type: ignore[attr-defined]
    big = TaskResult(JOB, 0, "train", "task-0", "site-1", "OK", DXO(WEIGHTS, {"w": np.zeros(2**18, np.float32)}))
    svc._publish_result(big)  # 1 MiB: large
    small = TaskResult(JOB, 0, "train", "task-x", "site-1", "OK", DXO(WEIGHTS, {"w": np.zeros(4, np.float32)}))
    svc._publish_result(small)
    assert svc.large_unconfirmed == 1
    worker = threading.Thread(target=svc._worker, daemon=True)
    worker.start()
    svc.work.put(queued_work(svc, task(model_from="", w=np.ones(4, np.float32))))
    time.sleep(0.3)
    assert svc.outbox.empty()  # not run yet
    sends[0](None)  # the broker confirms the large result
    deadline = time.monotonic() + 5
    while svc.outbox.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not svc.outbox.empty() and svc.large_unconfirmed == 0
    svc.work.put(None)
    worker.join(5)


def queued_work(svc: ClientService, t: TrainTask) -> Any:
    svc.on_message(delivery(t))
    return svc.work.get_nowait()
