"""Large messages in parts through the real broker: order, duplicates, gaps, checksums, streaming."""

from __future__ import annotations

import random
import time
from dataclasses import replace

import numpy as np
import pytest

from sagmq.amqp import AmqpBus
from sagmq.wire.blob import split
from sagmq.wire.bus import Delivery
from sagmq.wire.codec import DXO
from sagmq.wire.messages import RoundAggregated, RoundClose, RoundOpen, TaskResult
from sagmq.wire.settings import Settings
from sagmq.wire.topology import RK_RESULT, RK_ROUND_CLOSE, RK_ROUND_OPEN, service_topology, site_topology
from tests.conftest import aggregator_thread

pytestmark = pytest.mark.broker
CHUNK = 4096


def mixed() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"conv": rng.standard_normal((13, 17)).astype(np.float32),
            "bias": rng.standard_normal(1001).astype(np.float64),
            "steps": np.arange(999, dtype=np.int32).reshape(9, 111),
            "flags": np.array([1, 0, 1], dtype=np.int8),
            "half": rng.standard_normal(777).astype(np.float16)}


@pytest.fixture
def small(settings: Settings) -> Settings:
    return replace(settings, chunk_bytes=CHUNK, chunk_timeout_s=0.5)


def _bus(s: Settings, name: str) -> AmqpBus:
    b = AmqpBus(s, name, connect_timeout_s=5).connect()
    b.declare(service_topology(s.prefix))
    b.declare(site_topology(s.prefix, "site-1"))
    return b


def _collect(bus: AmqpBus, queue: str, want: int, timeout: float = 5) -> list[Delivery]:
    got: list[Delivery] = []
    bus.consume(queue, got.append, prefetch=0)
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        bus.process(0.05)
        bus.expire_blobs()
    bus.process(0.2)
    return got


def _task(data: dict[str, np.ndarray]) -> TaskResult:
    return TaskResult("job", 0, "train", "t", "site-1", "OK", DXO("WEIGHTS", data, {"NUM_STEPS_CURRENT_ROUND": 2}))


def _publish_parts(bus: AmqpBus, s: Settings, msg: TaskResult, order: list[int] | None = None,
                   corrupt: int | None = None, drop: int | None = None) -> int:
    parts = list(split(msg.to_wire(), CHUNK))
    idx = order if order is not None else list(range(len(parts)))
    for i in idx:
        if i == drop:
            continue
        body = parts[i].body
        if i == corrupt:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        props = bus.properties(msg.TYPE, {**parts[i].headers, "site": "site-1"})
        bus.publish_raw(bus.names.tasks, "site-1", body, props)
    return len(parts)


def test_mixed_dtypes_round_trip_in_parts(small: Settings) -> None:
    bus = _bus(small, "test")
    data = mixed()
    bus.publish(bus.names.tasks, "site-1", _task(data))
    (d,) = _collect(bus, bus.names.site_queue("site-1"), 1)
    assert len(d.parts) >= 4  # it really travelled in parts
    got = d.message(TaskResult, 2**20)
    assert got.dxo is not None and set(got.dxo.data) == set(data)
    for k, v in data.items():
        assert got.dxo.data[k].dtype == v.dtype and got.dxo.data[k].shape == v.shape
        np.testing.assert_array_equal(got.dxo.data[k], v)
        assert got.dxo.data[k].flags.writeable  # assembled into one owned buffer
    assert got.dxo.meta == {"NUM_STEPS_CURRENT_ROUND": 2}
    assert bus.channel.queue_declare(bus.names.site_queue("site-1"), passive=True).method.message_count == 0
    bus.close()


def test_out_of_order_and_duplicate_parts_assemble_once(small: Settings) -> None:
    bus = _bus(small, "test")
    data = mixed()
    n = len(list(split(_task(data).to_wire(), CHUNK)))
    order = [*range(n), 3, 0, n - 1]
    random.Random(1).shuffle(order)
    _publish_parts(bus, small, _task(data), order=order)
    got = _collect(bus, bus.names.site_queue("site-1"), 2, timeout=2)
    assert len(got) == 1
    msg = got[0].message(TaskResult, 2**20)
    assert msg.dxo is not None
    np.testing.assert_array_equal(msg.dxo.data["bias"], data["bias"])
    bus.close()


@pytest.mark.parametrize("fault", ["missing", "corrupt"])
def test_missing_or_corrupt_part_is_dead_lettered_and_nothing_hangs(small: Settings, fault: str) -> None:
    bus = _bus(small, "test")
    n = _publish_parts(bus, small, _task(mixed()), drop=4 if fault == "missing" else None,
                       corrupt=4 if fault == "corrupt" else None)
    t0 = time.monotonic()
    got = _collect(bus, bus.names.site_queue("site-1"), 1, timeout=3)
    assert got == [] and time.monotonic() - t0 < 5
    method, props, _ = bus.channel.basic_get(bus.names.dead_queue, auto_ack=True)
    assert method is not None
    reason = props.headers["x-sagmq-reason"]
    assert (f"parts [4] of {n} missing" in reason) if fault == "missing" else ("checksum mismatch" in reason)
    if fault == "corrupt":  # the rest of the blob does not linger
        assert bus.channel.queue_declare(bus.names.site_queue("site-1"), passive=True).method.message_count == 0
    bus.close()


def test_aggregator_streams_parts_and_rebuilds_without_a_bad_result(small: Settings) -> None:
    with aggregator_thread(small, grace_s=2, tick_s=0.05):
        _stream_and_rebuild(small)


def _stream_and_rebuild(small: Settings) -> None:
    bus = _bus(small, "test")
    base = mixed()
    ev = bus.names.events
    sites = ["site-1", "site-2", "site-3"]
    bus.publish(ev, RK_ROUND_OPEN, RoundOpen("job", 0, "t", sites, "WEIGHTS", {"site-2": 3.0},
                                              {k: v.dtype.str for k, v in base.items()},
                                              {k: list(v.shape) for k, v in base.items()}))

    def result(site: str, delta: float) -> TaskResult:
        data = {k: (v + delta).astype(v.dtype) for k, v in base.items()}
        return TaskResult("job", 0, "train", "t", site, "OK", DXO("WEIGHTS", data, {}))

    bad = result("site-3", 1.0)
    assert bad.dxo is not None
    bad.dxo.data["half"][-1] = np.nan  # in the last part: earlier parts are already added
    for r in (result("site-1", 1.0), bad, result("site-2", 5.0)):
        bus.publish(bus.names.results, RK_RESULT, r, headers={"site": r.site})
    time.sleep(1.0)
    bus.publish(ev, RK_ROUND_CLOSE, RoundClose("job", 0, "test", ["site-1", "site-2"]))
    agg = None
    deadline = time.monotonic() + 15
    while agg is None and time.monotonic() < deadline:
        method, props, body = bus.channel.basic_get(bus.names.server_queue, auto_ack=True)
        if method is None:
            bus.process(0.05)
            continue
        if props.type == "round.aggregated":
            agg = _assemble_one(bus, props, body)
    assert agg is not None and agg.dxo is not None
    assert sorted(agg.accepted) == ["site-1", "site-2"]
    for k, v in base.items():  # weights 1 and 3: (1·(v+1) + 3·(v+5)) / 4
        want = ((v + 1).astype(v.dtype).astype(np.float64) + 3 * (v + 5).astype(v.dtype)) / 4
        # as NVFlare: a float variable keeps its dtype, an integer one averages to float64 (no truncation)
        dtype = v.dtype if np.issubdtype(v.dtype, np.floating) else np.dtype(np.float64)
        np.testing.assert_allclose(agg.dxo.data[k].astype(np.float64), want.astype(dtype), rtol=1e-3, atol=1e-3)
        assert agg.dxo.data[k].dtype == dtype
    reasons = []
    while True:
        method, props, _ = bus.channel.basic_get(bus.names.dead_queue, auto_ack=True)
        if method is None:
            break
        reasons.append(props.headers["x-sagmq-reason"])
    assert any("NaN or Inf" in r for r in reasons), reasons
    bus.close()


def _assemble_one(bus: AmqpBus, props: object, body: bytes) -> RoundAggregated | None:
    """round.aggregated may itself come in parts: read the rest of them from the queue."""
    from sagmq.wire.blob import Assembly, is_part, part_info
    from sagmq.wire.messages import decode, from_wire

    headers = dict(props.headers or {})  # type: ignore[attr-defined]
    if not is_part(headers):
        return decode(RoundAggregated, body, 2**24)
    blob, idx, n, size = part_info(headers)
    asm = Assembly(blob, n, size, 2**30)
    asm.add(idx, headers, body, 2**24)
    while not asm.complete():
        method, p, b = bus.channel.basic_get(bus.names.server_queue, auto_ack=True)
        if method is None:
            time.sleep(0.02)
            continue
        h = dict(p.headers or {})
        if is_part(h) and part_info(h)[0] == blob:
            asm.add(part_info(h)[1], h, b, 2**24)
    return from_wire(RoundAggregated, asm.message_map())
