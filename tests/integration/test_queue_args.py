"""Queue arguments of issue 12 on the real broker: site queue expiry, quorum queues, several broker URLs."""

from __future__ import annotations

import subprocess
import time
from dataclasses import replace

import pika
import pika.exceptions as px
import pytest

from sagmq.amqp import AmqpBus
from sagmq.wire.settings import Settings
from sagmq.wire.topology import Names, rk_aggregate, service_topology, site_topology, work_queue_arguments

pytestmark = [pytest.mark.broker]


def queue_depth(settings: Settings, queue: str) -> int | None:
    """Messages in a queue, None if it does not exist (a connection of its own: a 404 closes the channel)."""
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_urls[0]))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    except px.ChannelClosedByBroker as e:
        assert e.reply_code == 404
        return None
    finally:
        conn.close()


def queue_types(prefix: str) -> dict[str, str]:
    out = subprocess.run(["rabbitmqctl", "-q", "--no-table-headers", "list_queues", "name", "type"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    rows = [line.split("\t") for line in out.splitlines() if line.startswith(f"{prefix}.")]
    return {r[0]: r[1].strip() for r in rows}


def test_a_site_queue_nobody_uses_expires_with_the_forwarded_model_in_it(settings: Settings) -> None:
    s = replace(settings, site_queue_expires_s=2.0)
    q = Names(s.prefix).site_queue("gone-1")
    bus = AmqpBus(s, "t", connect_timeout_s=5).connect()
    try:
        bus.declare(service_topology(s.prefix, s))
        bus.declare(site_topology(s.prefix, "gone-1", s))
        bus.publish_bytes(bus.names.events, rk_aggregate("gone-1"), b"a forwarded model", "round.aggregated")
    finally:
        bus.close()  # the site is gone: no consumer, nobody declares its queue again
    assert queue_depth(s, q) == 1  # (a declare, even passive, counts as a use: from here on only listed)
    deadline = time.monotonic() + 10
    while q in queue_types(s.prefix):
        assert time.monotonic() < deadline, f"{q} still there 10 s after its 2 s expiry"
        time.sleep(0.5)
    # a site that comes back declares its queue again (and the model is gone with the old one)
    bus = AmqpBus(s, "t", connect_timeout_s=5).connect()
    try:
        bus.declare(site_topology(s.prefix, "gone-1", s))
        assert queue_depth(s, q) == 0
    finally:
        bus.channel.queue_delete(q)
        bus.close()


def test_a_site_queue_of_an_older_deployment_is_used_as_it_is(settings: Settings,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    n = Names(settings.prefix)
    bus = AmqpBus(settings, "t", connect_timeout_s=5).connect()
    try:
        bus.declare(service_topology(settings.prefix, settings))
        bus.channel.queue_declare(n.site_queue("site-1"), durable=True, arguments=work_queue_arguments(n))
        with caplog.at_level("WARNING"):
            bus.declare(site_topology(settings.prefix, "site-1", settings))  # with x-expires now
        advice = [r.getMessage() for r in caplog.records if "exists with other arguments" in r.getMessage()]
        assert len(advice) == 1 and "x-expires" in advice[0] and "set_policy" in advice[0]
        bus.publish_bytes(n.tasks, "site-1", b"task", "task")  # bound and routable as before
        assert queue_depth(settings, n.site_queue("site-1")) == 1
    finally:
        bus.close()


def test_quorum_queues_where_the_topology_says(settings: Settings) -> None:
    s = replace(settings, queue_type="quorum")
    bus = AmqpBus(s, "t", connect_timeout_s=5).connect()
    try:
        bus.declare(service_topology(s.prefix, s))
        bus.declare(site_topology(s.prefix, "site-1", s))
        types = queue_types(s.prefix)
    finally:
        bus.close()
    n = Names(s.prefix)
    durable = [n.results_queue, n.server_queue, n.server_admin_queue, n.aggregator_queue, n.persistor_queue,
               n.dead_queue, n.site_queue("site-1")]
    assert {q: types.get(q) for q in durable} == dict.fromkeys(durable, "quorum")


def test_the_first_broker_url_that_answers_is_used(settings: Settings) -> None:
    dead = "amqp://guest:guest@127.0.0.1:1/%2F"
    s = replace(settings, amqp_url=f"{dead},{settings.amqp_url}")
    bus = AmqpBus(s, "t", connect_timeout_s=5).connect()
    try:
        bus.declare(service_topology(s.prefix, s))
        bus.publish_bytes(bus.names.events, "model.load", b"x", "model.load")
        assert bus.channel.queue_declare(bus.names.persistor_queue, passive=True).method.message_count == 1
    finally:
        bus.close()
