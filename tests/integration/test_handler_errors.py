"""A handler's bug is not a connection error: its message is dead-lettered once and the bus goes on."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pika.exceptions as px
import pytest

from sagmq.amqp import AmqpBus
from sagmq.wire.bus import Delivery
from sagmq.wire.messages import Control, decode
from sagmq.wire.settings import Settings
from sagmq.wire.topology import service_topology, site_topology

pytestmark = pytest.mark.broker


@pytest.fixture
def bus(settings: Settings) -> Iterator[AmqpBus]:
    b = AmqpBus(settings, "test-handler-errors", connect_timeout_s=5).connect()
    b.declare(service_topology(settings.prefix))
    b.declare(site_topology(settings.prefix, "site-1"))
    yield b
    b.close()


def failing_assert(command: str) -> None:
    assert command != "bad", "the handler's own check failed"


def failing_channel_error(command: str) -> None:
    if command == "bad":  # what a handler's own pika use (or a bug that mimics it) may raise
        raise px.ChannelClosedByBroker(406, "PRECONDITION_FAILED - not ours")


@pytest.mark.parametrize(("fail", "reason"), [
    (failing_assert, "internal error: AssertionError: the handler's own check failed"),
    (failing_channel_error, "internal error: ChannelClosedByBroker: (406, 'PRECONDITION_FAILED - not ours')"),
])
def test_a_failing_handler_dead_letters_its_message_once_and_goes_on(bus: AmqpBus, fail: Callable[[str], None],
                                                                     reason: str) -> None:
    n = bus.names
    seen: list[str] = []

    def handler(d: Delivery) -> None:
        command = decode(Control, d.body, 1000).command
        seen.append(command)
        fail(command)

    generation = bus.generation
    bus.consume(n.site_queue("site-1"), handler, prefetch=1)
    bus.publish(n.tasks, "site-1", Control("bad"), headers={"job_id": "j1", "site": "site-1"})
    bus.publish(n.tasks, "site-1", Control("good"))
    deadline = time.monotonic() + 10
    while "good" not in seen and time.monotonic() < deadline:
        bus.process(0.1)
    bus.process(0.3)  # a redelivery, if there were one, would come now
    assert seen == ["bad", "good"]  # handled once, then the next message normally
    assert bus.generation == generation and bus.dead_lettered == 1  # no reconnect
    dead = []
    while (got := bus.channel.basic_get(n.dead_queue, auto_ack=True))[0] is not None:
        dead.append(got)
    assert len(dead) == 1
    _, props, body = dead[0]
    assert props.headers["x-sagmq-reason"].startswith(reason)  # (pytest appends its own explanation to asserts)
    assert props.headers["x-sagmq-queue"] == n.site_queue("site-1")
    assert decode(Control, body, 1000).command == "bad"
    assert bus.channel.queue_declare(n.site_queue("site-1"), passive=True).method.message_count == 0
