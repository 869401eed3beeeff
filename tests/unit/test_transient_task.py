"""A round's task travels transient: after a reconnect (the broker may have restarted and dropped it),
every target that owes an answer and stays idle for three heartbeats gets the whole task again."""

from __future__ import annotations

import numpy as np

from sagmq.server.scatter_and_gather import OpenRound, SendTask
from tests.unit.test_scatter_and_gather import GRACE, SMALL, Driver, kinds, spec, with_sites_heard_before_the_round


def test_round_tasks_are_transient() -> None:
    d = with_sites_heard_before_the_round(spec(min_clients=3))
    d.at(1)
    d.sag.on_reconnect(d.now)
    d.beat("a")
    assert d.tick() == []
    d.at(1 + GRACE)
    d.beat("a")
    (send,) = [e for e in d.tick() if "a" in getattr(e, "sites", ())]
    assert isinstance(send, SendTask) and send.transient  # the re-sent task too


def test_after_a_reconnect_an_idle_target_that_kept_its_process_gets_the_whole_task_once() -> None:
    d = with_sites_heard_before_the_round(spec(min_clients=3))
    d.at(1)
    d.beat("a", 0)  # still training: it holds its task
    d.beat("b")  # idle, same process: its queued task was dropped by the restart
    d.verdict("c")  # answered: owes nothing
    effects = d.sag.on_reconnect(d.now)
    assert kinds(effects) == ["OpenRound"] and isinstance(effects[0], OpenRound)
    assert d.tick() == []
    d.at(1 + GRACE - 0.1)
    d.beat("a", 0)
    d.beat("b")
    assert d.tick() == []  # a task that survived would have shown as busy by now
    d.at(1 + GRACE)
    d.beat("a", 0)
    (send,) = d.tick()
    assert isinstance(send, SendTask) and send.sites == ("b",) and send.task.task_id == d.sag.task_id
    np.testing.assert_array_equal(send.task.dxo.data["w"], SMALL["w"])
    d.at(100)
    d.beat("b")
    assert d.tick() == []  # once per reconnect


def test_without_a_reconnect_an_idle_target_that_kept_its_process_gets_nothing() -> None:
    d = with_sites_heard_before_the_round(spec(min_clients=3))
    for dt in (1.0, 1 + GRACE, 60.0):
        d.at(dt)
        d.beat("b")
        assert d.tick() == []


def test_a_second_reconnect_allows_one_more_whole_task() -> None:
    d = with_sites_heard_before_the_round(spec(min_clients=3))
    d.at(1)
    d.sag.on_reconnect(d.now)
    d.beat("b")
    d.tick()
    d.at(1 + GRACE)
    assert all(isinstance(e, SendTask) for e in d.tick())
    d.at(20)
    d.sag.on_reconnect(d.now)
    d.beat("b")
    d.tick()
    d.at(20 + GRACE)
    d.beat("b")
    sends = [e for e in d.tick() if isinstance(e, SendTask)]
    assert "b" in {s for e in sends for s in e.sites}


def test_the_first_task_of_a_round_is_transient() -> None:
    d = Driver(spec(min_clients=3))
    sends = [e for e in d.load() if isinstance(e, SendTask)]
    assert sends and all(e.transient for e in sends)
