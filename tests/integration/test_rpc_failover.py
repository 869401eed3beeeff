"""SAGMQ_AMQP_URL with several brokers on the admin CLI's paths: the blocking admin connection tries each
URL in turn (a host that does not resolve like a refused one; refused credentials stop there), and an
RPC in flight when its broker dies is sent again on the next broker, its reply consumer set up there."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sagmq.amqp import AmqpBus
from sagmq.amqp.claim import SiteClaim
from sagmq.amqp.rpc import RequestLost, RequestNotTaken
from sagmq.cli.admin import AdminClient
from sagmq.cli.jobs import wait_job
from sagmq.wire.bus import Delivery
from sagmq.wire.errors import BrokerUnavailable, SagmqError
from sagmq.wire.messages import AdminReply, AdminRequest, decode
from sagmq.wire.settings import Settings
from sagmq.wire.topology import service_topology
from tests.brokernode import RabbitNode, running_node

pytestmark = [pytest.mark.broker]

NOWHERE = "amqp://guest:guest@nosuchhost.invalid:5672/%2F"


def test_the_admin_channel_skips_a_host_that_does_not_resolve(settings: Settings) -> None:
    s = replace(settings, amqp_url=f"{NOWHERE},{settings.amqp_url}")
    bus = AmqpBus(s, "multi-admin", connect_timeout_s=5).connect()  # the SelectConnection path
    try:
        bus.declare(service_topology(s.prefix, s))
        ok = bus.on_admin_channel(lambda ch: ch.queue_declare(bus.names.server_admin_queue, passive=True))
        assert ok.method.consumer_count == 0
    finally:
        bus.close()


def test_the_admin_channel_says_why_the_last_url_failed(settings: Settings) -> None:
    s = replace(settings, amqp_url=f"{settings.amqp_url},{NOWHERE}")
    bus = AmqpBus(replace(s, amqp_url=f"{NOWHERE},{NOWHERE.replace('nosuchhost', 'nosuchhost2')}"), "t")
    with pytest.raises(BrokerUnavailable, match="cannot resolve"):
        _ = bus.channel
    assert AmqpBus(s, "t").channel.is_open  # the first answers: the second is never tried


def test_a_site_name_claim_skips_a_host_that_does_not_resolve(settings: Settings) -> None:
    claim = SiteClaim(replace(settings, amqp_url=f"{NOWHERE},{settings.amqp_url}"), "multi-claim", connect_timeout_s=5)
    try:
        assert claim.claim("site-{n}") == "site-1"
    finally:
        claim.close()


def test_refused_credentials_are_not_tried_on_the_next_url(settings: Settings) -> None:
    wrong = settings.amqp_url.replace("guest:guest@", "guest:wrong@")
    assert wrong != settings.amqp_url
    bus = AmqpBus(replace(settings, amqp_url=f"{wrong},{settings.amqp_url}"), "t")
    with pytest.raises(BrokerUnavailable, match="refused the credentials"):
        _ = bus.channel


@pytest.fixture
def node(tmp_path: Path) -> Iterator[RabbitNode]:
    with running_node(base_dir=tmp_path / "node") as n:
        yield n


class Server:
    """Answers admin requests on the shared broker with the replies given, in turn (the last one again)."""

    def __init__(self, settings: Settings, replies: list[dict[str, Any]]) -> None:
        self.bus = AmqpBus(settings, "rpc-server", connect_timeout_s=5).connect()
        self.bus.declare(service_topology(settings.prefix, settings))
        self.asked: list[str] = []
        self.stop = threading.Event()

        def on_req(d: Delivery) -> None:
            self.asked.append(decode(AdminRequest, d.body, 10**6).command)
            self.bus.reply(d, AdminReply(True, replies[min(len(self.asked), len(replies)) - 1]))
            self.bus.ack(d)

        self.bus.consume(self.bus.names.server_admin_queue, on_req, prefetch=1)
        self.thread = threading.Thread(target=self.bus.run, args=(self.stop,))
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.bus.close()


def kill_later(node: RabbitNode, after_s: float) -> threading.Timer:
    t = threading.Timer(after_s, node.kill)
    t.start()
    return t


def test_a_request_in_flight_is_sent_again_on_the_next_broker(settings: Settings, node: RabbitNode) -> None:
    server = Server(settings, [{"echo": "again"}])  # on the second broker only: the first never answers
    bus = AmqpBus(replace(settings, amqp_url=f"{node.url},{settings.amqp_url}"), "admin", connect_timeout_s=5).connect()
    try:
        bus.declare(service_topology(settings.prefix, settings))
        killer = kill_later(node, 1.5)  # the request waits on the first broker when it dies
        d = bus.rpc(bus.names.admin, "server", AdminRequest("status"), 20)
        killer.join()
        assert decode(AdminReply, d.body, 10**6).result == {"echo": "again"}
        assert server.asked == ["status"]
        assert bus.generation == 2  # answered on the second connection (no 406 fast reply consumer)
        again = bus.rpc(bus.names.admin, "server", AdminRequest("status"), 5)  # the new consumer serves on
        assert decode(AdminReply, again.body, 10**6).result == {"echo": "again"}
    finally:
        bus.close()
        server.close()


def test_a_connection_lost_while_publishing_the_request(settings: Settings, node: RabbitNode,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker dies between the reply consumer's set-up and the request's confirm: the request goes again
    on the next broker with a reply consumer there (publishing it on the new connection's channel without
    one is refused by the broker: 406 PRECONDITION_FAILED - fast reply consumer does not exist)."""
    server = Server(settings, [{"echo": "after"}])
    bus = AmqpBus(replace(settings, amqp_url=f"{node.url},{settings.amqp_url}"), "admin", connect_timeout_s=5).connect()
    publish = bus.publish_request
    calls: list[int] = []

    def dying(*args: Any) -> None:
        calls.append(bus.generation)
        if len(calls) == 1:
            node.kill()
        publish(*args)

    monkeypatch.setattr(bus, "publish_request", dying)
    try:
        bus.declare(service_topology(settings.prefix, settings))
        d = bus.rpc(bus.names.admin, "server", AdminRequest("status"), 20)
        assert decode(AdminReply, d.body, 10**6).result == {"echo": "after"}
        assert calls == [1, 2] and server.asked == ["status"]
    finally:
        bus.close()
        server.close()


def test_a_request_that_changes_something_is_not_sent_twice(settings: Settings, node: RabbitNode) -> None:
    server = Server(settings, [{"job_id": "j"}])
    bus = AmqpBus(replace(settings, amqp_url=f"{node.url},{settings.amqp_url}"), "admin", connect_timeout_s=5).connect()
    try:
        bus.declare(service_topology(settings.prefix, settings))
        killer = kill_later(node, 1.5)
        with pytest.raises(RequestLost, match="may or may not have been carried out"):
            bus.rpc(bus.names.admin, "server", AdminRequest("submit"), 20, resend=False)
        killer.join()
        assert server.asked == []
        d = bus.rpc(bus.names.admin, "server", AdminRequest("list"), 5)  # the bus is on the second broker now
        assert decode(AdminReply, d.body, 10**6).result == {"job_id": "j"}
    finally:
        bus.close()
        server.close()


def test_wait_follows_the_job_across_a_broker_failover(settings: Settings, node: RabbitNode) -> None:
    running = {"job_id": "j1", "status": "running", "history": [{"round": 0, "accepted": ["site-1"]}]}
    done = {**running, "status": "finished", "history": [*running["history"], {"round": 1, "accepted": ["site-1"]}]}
    server = Server(settings, [running, running, done])
    admin = AdminClient(replace(settings, amqp_url=f"{node.url},{settings.amqp_url}"), 5.0, server_grace_s=5.0)
    try:
        # the server's admin queue has a consumer on the second broker only: wait looks for one on the
        # first (the blocking admin connection) until the first dies, then moves to the second
        killer = kill_later(node, 1.5)
        out = Path(settings.workspace) / "wait.out"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as f:
            st = wait_job(admin, "j1", 60, out=f)
        killer.join()
        assert st["status"] == "finished"
        assert server.asked == ["status"] * 3
        text = out.read_text()
        assert "round 0" in text and "round 1" in text and "job j1 finished" in text, text
    finally:
        admin.close()
        server.close()


def test_a_request_the_broker_did_not_take_is_sent_again(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A nack (a quorum queue whose leader is gone) of a request that only reads: sent again after a pause;
    one that changes something fails with RequestNotTaken, which `sagmq wait` also asks again after."""
    server = Server(settings, [{"echo": "taken"}])
    bus = AmqpBus(settings, "admin", connect_timeout_s=5).connect()
    publish = bus.publish_request
    calls: list[str] = []

    def nacked_once(*args: Any) -> None:
        calls.append(args[2].command)
        if len(calls) in (1, 3):
            raise SagmqError(f"the broker refused a message to {args[0]!r} ({args[1]!r})")  # as a nack says
        publish(*args)

    monkeypatch.setattr(bus, "publish_request", nacked_once)
    try:
        bus.declare(service_topology(settings.prefix, settings))
        d = bus.rpc(bus.names.admin, "server", AdminRequest("status"), 10)
        assert decode(AdminReply, d.body, 10**6).result == {"echo": "taken"}
        assert calls == ["status", "status"] and server.asked == ["status"]
        with pytest.raises(RequestNotTaken, match="refused a message"):
            bus.rpc(bus.names.admin, "server", AdminRequest("submit"), 10, resend=False)
        assert server.asked == ["status"]
    finally:
        bus.close()
        server.close()
