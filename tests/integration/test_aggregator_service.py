"""The aggregator service on the real broker: bad results are dead-lettered, good ones averaged."""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterator

import msgpack  # type: ignore[import-untyped]
import numpy as np
import pika
import pytest

from sagmq.aggregator.main import AggregatorService
from sagmq.amqp import AmqpBus
from sagmq.wire.codec import DXO
from sagmq.wire.messages import Contribution, RoundAggregated, RoundClose, RoundOpen, TaskResult, decode
from sagmq.wire.settings import Settings
from sagmq.wire.topology import RK_RESULT, RK_ROUND_CLOSE, RK_ROUND_OPEN
from tests.conftest import aggregator_thread

pytestmark = pytest.mark.broker
SHAPE = (3, 3)


@pytest.fixture
def aggregator(settings: Settings) -> Iterator[AggregatorService]:
    with aggregator_thread(settings, grace_s=0.5) as svc:
        yield svc


def test_hostile_results_are_dead_lettered_and_the_average_is_exact(aggregator: AggregatorService,
                                                                     settings: Settings) -> None:
    bus = AmqpBus(settings, "test", connect_timeout_s=5).connect()
    n = bus.names
    ev = n.events
    bus.publish(ev, RK_ROUND_OPEN, RoundOpen("job1", 0, "t0", ["site-1", "site-2"], "WEIGHTS", {"site-2": 3.0},
                                              {"w": "<f4"}, {"w": list(SHAPE)}))

    def result(site: str, value: float, **kw: object) -> TaskResult:
        fields = dict(job_id="job1", round=0, task_name="train", task_id="t0", site=site, rc="OK",
                      dxo=DXO("WEIGHTS", {"w": np.full(SHAPE, value, np.float32)}, {}))
        fields.update(kw)
        return TaskResult(**fields)  # type: ignore[arg-type]

    def raw(body: bytes, msg_type: str = "result", user: str | None = "guest", site: str = "site-1") -> None:
        props = pika.BasicProperties(type=msg_type, delivery_mode=2, user_id=user, headers={"site": site})
        bus.channel.basic_publish(n.results, RK_RESULT, body, props, mandatory=True)

    good = result("site-1", 2.0).to_wire()
    hostile = {
        "garbage": (b"\xc1\xff\x00garbage", {}),
        "wrong shape of message": (msgpack.packb({"hello": 1}), {}),
        "pickle": (pickle.dumps(np.ones(3)), {}),
        "object dtype": (msgpack.packb({**good, "dxo": {**good["dxo"], "data": {"w": {
            "dtype": "|O", "shape": [1], "data": b"\x00" * 8}}}}, use_bin_type=True), {}),
        "wrong dtype length": (msgpack.packb({**good, "dxo": {**good["dxo"], "data": {"w": {
            "dtype": "<f8", "shape": [3, 3], "data": b"\x00" * 36}}}}, use_bin_type=True), {}),
        "array shape": (result("site-1", 1.0, dxo=DXO("WEIGHTS", {"w": np.ones((4,), np.float32)}, {})).encode(), {}),
        "nan": (result("site-1", float("nan")).encode(), {}),
        "inf": (result("site-1", float("inf")).encode(), {}),
        "unknown site": (result("site-9", 1.0).encode(), {"site": "site-9"}),
        "wrong job": (result("site-1", 1.0, job_id="other").encode(), {}),
        "stale round": (result("site-1", 1.0, round=7).encode(), {}),
        "wrong type": (result("site-1", 1.0).encode(), {"msg_type": "control"}),
        "no user_id": (result("site-1", 1.0).encode(), {"user": None}),
        "header/body site mismatch": (result("site-1", 1.0).encode(), {"site": "site-2"}),
    }
    for body, kw in hostile.values():
        raw(body, **kw)  # type: ignore[arg-type]
    bus.publish(n.results, RK_RESULT, result("site-1", 2.0), headers={"site": "site-1"})
    bus.publish(n.results, RK_RESULT, result("site-1", 50.0), headers={"site": "site-1"})  # duplicate
    bus.publish(n.results, RK_RESULT, result("site-2", 6.0), headers={"site": "site-2"})
    time.sleep(0.5)
    bus.publish(ev, RK_ROUND_CLOSE, RoundClose("job1", 0, "test"))

    agg: RoundAggregated | None = None
    verdicts: list[Contribution] = []
    deadline = time.monotonic() + 10
    # verdicts are advisory (a channel of their own) and accepted ones wait for the aggregator's tick:
    # gather for a moment after the aggregate
    settle = 0.0
    while (agg is None or time.monotonic() < settle) and time.monotonic() < deadline:
        method, props, body = bus.channel.basic_get(n.server_queue, auto_ack=True)
        if method is None:
            time.sleep(0.05)
            continue
        if props.type == "round.aggregated":
            agg = decode(RoundAggregated, body, 10**6)
            settle = time.monotonic() + 0.3
        elif props.type == "contribution":
            verdicts.append(decode(Contribution, body, 10**6))
    assert agg is not None and agg.dxo is not None
    # weights: site-1 1.0, site-2 3.0 -> (2*1 + 6*3) / 4 = 5
    np.testing.assert_array_equal(agg.dxo.data["w"], np.full(SHAPE, 5.0, np.float32))
    assert agg.dxo.data["w"].dtype == np.float32
    assert sorted(agg.accepted) == ["site-1", "site-2"]
    # site-2's result closed the round (every target answered): the aggregate, which lists it, is its
    # verdict; site-1's went out only if a tick came between the two results
    assert [v.site for v in verdicts if v.accepted] in ([], ["site-1"])

    expected = ["not valid msgpack", "is missing", "not valid msgpack",
                "dtype '|O' is not allowed", "data bytes for shape", "has shape (4,)", "NaN or Inf", "NaN or Inf",
                "site site-9 is not a target", "result for round 7",
                "results queue takes result messages", "without a user_id", "does not match body site",
                "duplicate", "unknown job 'other'"]  # a result of an unknown job waits out the grace period
    reasons: list[str] = []
    deadline = time.monotonic() + 10
    while len(reasons) < len(expected) and time.monotonic() < deadline:
        method, props, _ = bus.channel.basic_get(n.dead_queue, auto_ack=True)
        if method is None:
            time.sleep(0.05)
            continue
        reasons.append(props.headers["x-sagmq-reason"])
    assert len(reasons) == len(expected), reasons
    for want, got in zip(expected, reasons):
        assert want in got, (want, got)
    assert aggregator.bus.dead_lettered == len(expected)
    bus.close()


def test_oversize_and_spoofed_results_are_refused(settings: Settings) -> None:
    # The aggregator runs as user "aggregator" (provisioned style) with a 64 KiB body limit; its
    # connection is the test broker's guest, so every result arrives with user_id "guest".
    from dataclasses import replace

    own = replace(settings, amqp_url=settings.amqp_url.replace("guest:guest@", "aggregator:x@"),
                  max_body_bytes=65536)
    with aggregator_thread(settings, grace_s=0.5, tick_s=0.05, service_settings=own) as svc:
        _spoof_and_oversize(settings, svc)


def _spoof_and_oversize(settings: Settings, svc: AggregatorService) -> None:
    test = AmqpBus(settings, "test", connect_timeout_s=5).connect()
    n = test.names
    test.publish(n.events, RK_ROUND_OPEN, RoundOpen("job2", 0, "t0", ["site-1"], "WEIGHTS", {},
                                                     {"w": "<f4"}, {"w": [3, 3]}))
    big = TaskResult("job2", 0, "train", "t0", "site-1", "OK",
                     DXO("WEIGHTS", {"w": np.ones((3, 3), np.float32)}, {"pad": "x" * 100_000}))
    ok = TaskResult("job2", 0, "train", "t0", "site-1", "OK", DXO("WEIGHTS", {"w": np.ones((3, 3), np.float32)}, {}))
    props = pika.BasicProperties(type="result", delivery_mode=2, user_id="guest", headers={"site": "site-1"})
    test.channel.basic_publish(n.results, RK_RESULT, big.encode(), props, mandatory=True)
    test.channel.basic_publish(n.results, RK_RESULT, ok.encode(), props, mandatory=True)
    reasons: list[str] = []
    deadline = time.monotonic() + 10
    while len(reasons) < 2 and time.monotonic() < deadline:
        method, p, _ = test.channel.basic_get(n.dead_queue, auto_ack=True)
        if method is None:
            time.sleep(0.05)
            continue
        reasons.append(p.headers["x-sagmq-reason"])
    assert "exceeds the limit of 65536" in reasons[0], reasons
    assert "spoofed sender: user 'guest' sent a result for site 'site-1'" in reasons[1], reasons
    assert svc.open["job2"].aggregator.accepted == []
    test.close()


def test_a_refused_aggregate_is_sent_again_later_with_its_inputs_held(settings: Settings,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import sagmq.aggregator.main as agg_main
    from sagmq.wire.topology import RK_ROUND_AGGREGATED

    monkeypatch.setattr(agg_main, "RETRY_S", 0.3)
    bus = AmqpBus(settings, "test", connect_timeout_s=5).connect()
    n = bus.names
    with aggregator_thread(settings, grace_s=0.5) as svc:  # (it declares the topology: unbind after)
        bus.channel.queue_unbind(n.server_queue, n.events, RK_ROUND_AGGREGATED)  # the aggregate is unroutable
        bus.publish(n.events, RK_ROUND_OPEN, RoundOpen("job1", 0, "t0", ["site-1"], "WEIGHTS", {},
                                                       {"w": "<f4"}, {"w": list(SHAPE)}))
        bus.publish(n.results, RK_RESULT, TaskResult("job1", 0, "train", "t0", "site-1", "OK",
                                                     DXO("WEIGHTS", {"w": np.full(SHAPE, 4.0, np.float32)}, {})),
                    headers={"site": "site-1"})
        deadline = time.monotonic() + 10
        while svc.refused_aggregates < 3:  # refused, and tried again, every RETRY_S (not in a tight loop)
            assert time.monotonic() < deadline, f"refused {svc.refused_aggregates} time(s) only"
            time.sleep(0.05)
        assert svc.refused_aggregates <= 6
        assert not svc.open  # the round is closed, its aggregate waits to be sent again
        bus.channel.queue_bind(n.server_queue, n.events, RK_ROUND_AGGREGATED)
        agg = None
        while agg is None:
            assert time.monotonic() < deadline + 5, "the aggregate never came once it could be routed"
            method, props, body = bus.channel.basic_get(n.server_queue, auto_ack=True)
            if method is not None and props.type == RoundAggregated.TYPE:
                agg = decode(RoundAggregated, body, 2**20)
            time.sleep(0.02)
        assert agg.dxo is not None
        np.testing.assert_array_equal(agg.dxo.data["w"], np.full(SHAPE, 4.0, np.float32))
        time.sleep(0.3)
    # the aggregator is gone: had it not acked the inputs after the confirm, they would be back
    assert bus.channel.queue_declare(n.results_queue, passive=True).method.message_count == 0
    assert bus.channel.queue_declare(n.aggregator_queue, passive=True).method.message_count == 0
    bus.close()


def test_accepted_verdicts_go_out_while_the_round_is_open_and_not_after_it_closed(
        aggregator: AggregatorService, settings: Settings) -> None:
    bus = AmqpBus(settings, "test", connect_timeout_s=5).connect()
    n = bus.names
    bus.publish(n.events, RK_ROUND_OPEN, RoundOpen("job3", 0, "t0", ["site-1", "site-2"], "WEIGHTS", {},
                                                    {"w": "<f4"}, {"w": list(SHAPE)}))

    def send(site: str) -> None:
        r = TaskResult("job3", 0, "train", "t0", site, "OK", DXO("WEIGHTS", {"w": np.ones(SHAPE, np.float32)}, {}))
        bus.publish(n.results, RK_RESULT, r, headers={"site": site})

    def server_messages(wait_s: float) -> list[tuple[str, bytes]]:
        out, end = [], time.monotonic() + wait_s
        while time.monotonic() < end:
            method, props, body = bus.channel.basic_get(n.server_queue, auto_ack=True)
            if method is None:
                time.sleep(0.02)
            else:
                out.append((props.type, body))
        return out

    send("site-1")
    first = server_messages(0.6)  # the round stays open: the verdict goes out at the next tick
    assert [(t, decode(Contribution, b, 10**6).site) for t, b in first] == [("contribution", "site-1")]
    send("site-2")  # the last target: the round closes at once
    after = server_messages(0.6)
    assert [t for t, _ in after] == ["round.aggregated"]  # no verdict for site-2: the aggregate lists it
    assert decode(RoundAggregated, after[0][1], 10**6).accepted == ["site-1", "site-2"]
    bus.close()
