"""The aggregator on a memory bus: round.open and results in, verdicts and the weighted mean out."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest

from sagmq.aggregator.main import AggregatorService
from sagmq.memory import MemoryBroker
from sagmq.wire.codec import DXO, WEIGHTS
from sagmq.wire.messages import Contribution, RoundAggregated, RoundOpen, TaskResult
from sagmq.wire.settings import Settings
from sagmq.wire.topology import RK_RESULT, RK_ROUND_OPEN
from tests.unit.choreography.harness import Probe, running, service_bus

JOB = "a" * 32
A = np.arange(9, dtype=np.float32).reshape(3, 3)


@pytest.fixture
def probe(broker: MemoryBroker, settings: Settings) -> Iterator[Probe]:
    """A probe, with the aggregator running."""
    p = Probe(broker, settings)
    bus = service_bus(broker, settings, "aggregator")
    with running(broker, lambda b: AggregatorService(settings, b, grace_s=0.5), bus):
        yield p


def open_round(p: Probe, shape: tuple[int, ...] = (3, 3)) -> None:
    """Round 0 of JOB for site-1 (weight 1) and site-2 (weight 3), one float32 variable w."""
    m = RoundOpen(JOB, 0, "task-0", ["site-1", "site-2"], WEIGHTS, {"site-1": 1.0, "site-2": 3.0},
                  {"w": "<f4"}, {"w": list(shape)})
    p.bus.publish(p.names.events, RK_ROUND_OPEN, m, headers={"job_id": JOB, "round": 0})


def result(site: str, w: np.ndarray) -> TaskResult:
    """A site's result for round 0, of one local step."""
    return TaskResult(JOB, 0, "train", "task-0", site, "OK", DXO(WEIGHTS, {"w": w}, {"NUM_STEPS_CURRENT_ROUND": 1}))


def send_result(p: Probe, r: TaskResult) -> None:
    """Publish a result as a site does."""
    p.bus.publish(p.names.results, RK_RESULT, r, headers={"job_id": r.job_id, "round": r.round, "site": r.site})


def test_two_results_give_the_exact_weighted_mean(probe: Probe) -> None:
    open_round(probe)
    send_result(probe, result("site-1", A))
    send_result(probe, result("site-2", A + 4))
    agg = probe.first(RoundAggregated, lambda m: m.job_id == JOB)
    assert sorted(agg.accepted) == ["site-1", "site-2"] and agg.task_id == "task-0"
    assert agg.dxo is not None and np.array_equal(agg.dxo.data["w"], A + 3)  # (1·A + 3·(A+4)) / 4


def test_large_results_are_streamed_part_by_part(broker: MemoryBroker, settings: Settings) -> None:
    small = replace(settings, chunk_bytes=4096)  # 8 kB results: a header and two data parts each
    p = Probe(broker, small)
    with running(broker, lambda b: AggregatorService(small, b, grace_s=0.5), service_bus(broker, small, "aggregator")):
        x = np.arange(2000, dtype=np.float32)
        open_round(p, (2000,))
        send_result(p, result("site-1", x))
        send_result(p, result("site-2", x + 4))
        agg = p.first(RoundAggregated)
        assert agg.dxo is not None and np.array_equal(agg.dxo.data["w"], x + 3)


def test_a_malformed_result_is_dead_lettered_with_a_reason(probe: Probe) -> None:
    open_round(probe)
    probe.bus.publish_bytes(probe.names.results, RK_RESULT, b"\x93 truncated", TaskResult.TYPE)
    dead = probe.dead()
    assert dead.header_str("x-sagmq-queue") == "t.results"
    assert "msgpack" in dead.header_str("x-sagmq-reason")


def test_a_result_of_the_wrong_shape_is_refused_with_a_verdict(probe: Probe) -> None:
    open_round(probe)
    send_result(probe, result("site-1", np.zeros(4, np.float32)))
    verdict = probe.first(Contribution, lambda c: c.site == "site-1")
    assert not verdict.accepted and verdict.reason
    assert probe.dead().header_str("x-sagmq-reason") == verdict.reason


def test_a_result_from_a_user_that_is_not_its_site_is_refused(broker: MemoryBroker, settings: Settings,
                                                               probe: Probe) -> None:
    open_round(probe)
    mallory = Probe(broker, settings, user="site-2")
    send_result(mallory, result("site-1", A))
    dead = probe.dead()
    assert "spoofed sender" in dead.header_str("x-sagmq-reason")
    assert dead.header_str("x-sagmq-original-user") == "site-2"
    assert probe.all(RoundAggregated) == []


def test_results_that_overtake_their_round_open_are_held(probe: Probe) -> None:
    send_result(probe, result("site-1", A))
    send_result(probe, result("site-2", A + 4))
    open_round(probe)
    agg = probe.first(RoundAggregated)
    assert agg.dxo is not None and np.array_equal(agg.dxo.data["w"], A + 3)


def test_a_lost_connection_rebuilds_the_round_from_redelivered_messages(broker: MemoryBroker,
                                                                       settings: Settings) -> None:
    p = Probe(broker, settings)
    bus = service_bus(broker, settings, "aggregator")
    with running(broker, lambda b: AggregatorService(settings, b, grace_s=0.5), bus):
        open_round(p)
        send_result(p, result("site-1", A))
        p.first(Contribution, lambda c: c.site == "site-1" and c.accepted)  # accepted and held, unacked
        generation = bus.generation
        bus.call_threadsafe(lambda: bus.reset("test"))
        p.wait(lambda: bus.generation > generation, "the aggregator's reconnect")
        send_result(p, result("site-2", A + 4))
        agg = p.first(RoundAggregated)
        assert sorted(agg.accepted) == ["site-1", "site-2"]
        assert agg.dxo is not None and np.array_equal(agg.dxo.data["w"], A + 3)  # site-1 counted once
    assert broker.depth("t.results") == broker.depth("t.aggregator") == 0  # every input acked


def test_an_accepted_result_waiting_for_its_verdict_holds_no_weights(broker: MemoryBroker, settings: Settings) -> None:
    """Issue 15: a result is in the sums once accepted; its verdict (sent at the next tick) must not keep its
    arrays alive, or a fast round holds a tick's worth of whole results."""
    p = Probe(broker, settings)
    bus = service_bus(broker, settings, "aggregator")
    with running(broker, lambda b: AggregatorService(settings, b, grace_s=0.5), bus) as svc:
        svc._flush_verdicts = lambda: None  # type: ignore[method-assign]  # keep them waiting
        open_round(p, (30, 30))
        send_result(p, result("site-1", np.ones((30, 30), np.float32)))
        deadline = time.monotonic() + 10
        while not svc.accepted_verdicts and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [(r.site, r.dxo) for r in svc.accepted_verdicts] == [("site-1", None)]
