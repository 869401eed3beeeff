"""What the bus counts on the real broker (sagmq.runtime.metrics): messages and bytes by kind in both
directions, each part of a large message, dead letters by reason, reconnects; a peer's junk type
property folds into kind "other"."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
import pytest

from sagmq.amqp import AmqpBus
from sagmq.wire.bus import Delivery
from sagmq.wire.codec import DXO, WEIGHTS
from sagmq.wire.errors import Rejected
from sagmq.wire.messages import Control, TaskResult
from sagmq.wire.settings import Settings
from sagmq.wire.topology import RK_RESULT, service_topology, site_topology

pytestmark = pytest.mark.broker
CHUNK = 64 * 1024


@pytest.fixture
def bus(settings: Settings) -> Iterator[AmqpBus]:
    b = AmqpBus(replace(settings, chunk_bytes=CHUNK), "test-metrics", connect_timeout_s=5).connect()
    b.declare(service_topology(settings.prefix))
    b.declare(site_topology(settings.prefix, "site-1"))
    yield b
    b.close()


def serve_until(bus: AmqpBus, done: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        bus.process(0.05)
    assert done(), "timed out"


def test_the_bus_counts_what_crosses_it(bus: AmqpBus) -> None:
    n, m = bus.names, bus.meter
    seen: list[str] = []

    def handler(d: Delivery) -> None:
        seen.append(d.msg_type)
        if d.message(Control, 1000).command == "spoof":  # (the junk body does not decode)
            raise Rejected("spoofed sender: user 'x' sent a control for site 'site-1'")

    bus.consume(n.site_queue("site-1"), handler, prefetch=10)
    bus.publish(n.tasks, "site-1", Control("hello"))
    bus.publish(n.tasks, "site-1", Control("spoof"))
    bus.publish_bytes(n.tasks, "site-1", b"\x80", "a-type-no-one-knows")
    serve_until(bus, lambda: len(seen) == 3)
    serve_until(bus, lambda: bus.sending == 0)  # the dead-letter copy is confirmed

    control = m.sent["control"]
    assert control[0] == 2 and control[1] > 0
    assert m.received["control"] == control  # the same two messages, the same bytes
    assert m.sent["other"] == [1, 1] and m.received["other"] == [1, 1]
    assert "a-type-no-one-knows" not in m.sent and "a-type-no-one-knows" not in m.received
    # the junk body is dead-lettered by the handler's decode error
    assert m.sent["dead"][0] == 2
    assert m.dead_letters["sender"] == 1 and m.dead_letters["decode"] == 1
    assert sum(m.dead_letters.values()) == bus.dead_lettered == 2

    # a large message counts each of its parts, with its body bytes
    weights = np.zeros(100_000, np.float32)  # 400 kB in parts of 64 kB
    result = TaskResult("job", 0, "train", "t", "site-1", "OK", DXO(WEIGHTS, {"w": weights}, {}))
    before = list(m.sent.get("result", [0, 0]))
    bus.publish(n.results, RK_RESULT, result)
    sent = m.sent["result"]
    parts = sent[0] - before[0]
    assert parts >= weights.nbytes // CHUNK
    assert sent[1] - before[1] >= weights.nbytes

    assert m.reconnects == 0
    bus.reset("test: drop the connection on purpose")
    bus.process(0.05)
    assert m.reconnects == 1
