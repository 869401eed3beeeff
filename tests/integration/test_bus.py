"""The bus against the real broker: confirms, fan-out, dead letters, RPC, limits, credentials."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from sagmq.amqp import AmqpBus
from sagmq.wire.bus import Delivery
from sagmq.wire.errors import BrokerUnavailable, Rejected, SagmqError
from sagmq.wire.messages import AdminReply, AdminRequest, Control, decode
from sagmq.wire.settings import Settings
from sagmq.wire.topology import service_topology, site_topology
from tests.conftest import wait_for

pytestmark = pytest.mark.broker


@pytest.fixture
def bus(settings: Settings) -> Iterator[AmqpBus]:
    b = AmqpBus(settings, "test", connect_timeout_s=5).connect()
    b.declare(service_topology(settings.prefix))
    for s in ("site-1", "site-2", "site-3"):
        b.declare(site_topology(settings.prefix, s))
    yield b
    b.close()


def drain(bus: AmqpBus, queue: str) -> list[tuple[dict[str, Any], bytes]]:
    out: list[tuple[dict[str, Any], bytes]] = []
    while True:
        method, props, body = bus.channel.basic_get(queue, auto_ack=True)
        if method is None:
            return out
        out.append(({"type": props.type, "user_id": props.user_id, "headers": props.headers,
                     "message_id": props.message_id, "delivery_mode": props.delivery_mode}, body))


def test_one_publish_fans_out_to_every_target_queue(bus: AmqpBus) -> None:
    n = bus.names
    bus.publish(n.tasks, "site-1", Control("abort", "job-x"), cc=["site-2", "site-3"], headers={"job_id": "job-x"})
    for site in ("site-1", "site-2", "site-3"):
        got = drain(bus, n.site_queue(site))
        assert len(got) == 1, site
        props, body = got[0]
        assert props["type"] == "control" and props["user_id"] == "guest" and props["delivery_mode"] == 2
        assert props["headers"]["job_id"] == "job-x" and props["headers"]["schema"] == "1"
        assert "BCC" not in props["headers"] and "CC" not in props["headers"]  # no target list for every target
        assert decode(Control, body, 1000) == Control("abort", "job-x")


def test_unroutable_publish_is_an_error(bus: AmqpBus) -> None:
    with pytest.raises(SagmqError, match="unroutable"):
        bus.publish(bus.names.tasks, "no-such-site", Control("abort"))


def test_oversize_message_is_refused_before_sending(bus: AmqpBus, settings: Settings) -> None:
    small = AmqpBus(replace(settings, max_body_bytes=2048), "small", connect_timeout_s=5).connect()
    try:
        with pytest.raises(SagmqError, match="exceeds SAGMQ_MAX_BODY_BYTES"):
            small.publish(bus.names.admin, "server", AdminRequest("submit", files={"x": b"0" * 4096}))
    finally:
        small.close()


def test_rejected_and_failing_messages_are_dead_lettered_with_reason(bus: AmqpBus) -> None:
    n = bus.names
    seen: list[str] = []

    def handler(d: Delivery) -> None:
        c = decode(Control, d.body, 1000)
        seen.append(c.command)
        if c.command == "bad":
            raise Rejected("bad command for the test")
        if c.command == "boom":
            raise RuntimeError("handler bug")

    bus.consume(n.site_queue("site-1"), handler, prefetch=1)
    for cmd in ("bad", "boom", "ok"):
        bus.publish(n.tasks, "site-1", Control(cmd), headers={"job_id": "j1", "site": "site-1"})
    deadline = time.monotonic() + 10
    while len(seen) < 3 and time.monotonic() < deadline:
        bus.process(0.1)
    assert seen == ["bad", "boom", "ok"]  # the consumer kept going
    dead = drain(bus, n.dead_queue)
    reasons = [p["headers"]["x-sagmq-reason"] for p, _ in dead]
    assert reasons == ["bad command for the test", "internal error: RuntimeError: handler bug"]
    h = dead[0][0]["headers"]
    assert h["x-sagmq-queue"] == n.site_queue("site-1") and h["x-sagmq-original-type"] == "control"
    assert h["job_id"] == "j1" and isinstance(h["x-sagmq-dead-at"], int)
    assert decode(Control, dead[0][1], 1000).command == "bad"  # the original body, intact
    assert drain(bus, n.site_queue("site-1")) == []  # everything was acked


def test_rpc_round_trip(bus: AmqpBus, settings: Settings) -> None:
    server = AmqpBus(settings, "rpc-server", connect_timeout_s=5).connect()
    stop = threading.Event()

    def serve() -> None:
        def on_req(d: Delivery) -> None:
            req = decode(AdminRequest, d.body, 10**6)
            server.reply(d, AdminReply(True, {"echo": req.args["x"]}))

        server.consume(server.names.server_admin_queue, on_req, prefetch=1)
        server.run(stop)

    t = threading.Thread(target=serve)
    t.start()
    try:
        d = bus.rpc(bus.names.admin, "server", AdminRequest("status", {"x": 42}), 10)
        assert decode(AdminReply, d.body, 10**6).result == {"echo": 42}
    finally:
        stop.set()
        t.join(5)
        server.close()


def test_rpc_times_out_without_a_server(bus: AmqpBus) -> None:
    t0 = time.monotonic()
    with pytest.raises(SagmqError, match="no reply"):
        bus.rpc(bus.names.admin, "persistor", AdminRequest("download"), 0.5)
    assert time.monotonic() - t0 < 5
    # the expired request does not linger to be executed later
    wait_for(lambda: bus.channel.queue_declare(bus.names.persistor_queue, passive=True).method.message_count == 0,
             5, "the expired request to leave the queue")


def test_bad_credentials_fail_fast(settings: Settings) -> None:
    wrong = replace(settings, amqp_url=settings.amqp_url.replace("guest:guest", "guest:wrong"))
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="refused the credentials"):
        AmqpBus(wrong, "bad", connect_timeout_s=30).connect()
    assert time.monotonic() - t0 < 5


def test_a_message_whose_handling_the_broker_refuses_is_dead_lettered_once(bus: AmqpBus) -> None:
    n = bus.names
    calls: list[str] = []

    def handler(d: Delivery) -> None:
        c = decode(Control, d.body, 1000)
        calls.append(c.command)
        if c.command == "spoof":  # publishing as another user: the broker answers 406 and closes the channel
            props = bus.properties("control")
            props.user_id = "somebody-else"
            bus.publish_raw(n.tasks, "site-2", b"x", props)

    bus.consume(n.site_queue("site-1"), handler, prefetch=1)
    bus.publish(n.tasks, "site-1", Control("spoof"))
    bus.publish(n.tasks, "site-1", Control("fine"))
    deadline = time.monotonic() + 10
    while "fine" not in calls and time.monotonic() < deadline:
        bus.process(0.1)
    assert calls == ["spoof", "fine"]  # handled once, then dead-lettered on redelivery; no loop
    dead = drain(bus, n.dead_queue)
    assert len(dead) == 1 and "406" in dead[0][0]["headers"]["x-sagmq-reason"]
    assert drain(bus, n.site_queue("site-2")) == []
