"""`sagmq dead list` and `sagmq dead show` read the dead-letter queue without emptying it, `sagmq dead purge`
empties it; admin requests that expire never reach it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from typing import Any

import pika
import pytest

from sagmq.amqp import AmqpBus
from sagmq.cli.admin import AdminClient
from sagmq.wire.bus import Delivery
from sagmq.wire.errors import Rejected, SagmqError
from sagmq.wire.messages import Control
from sagmq.wire.settings import Settings
from sagmq.wire.topology import RK_ADMIN_PERSISTOR, service_topology, site_topology
from tests.conftest import SAGMQ, wait_for

pytestmark = pytest.mark.broker


def test_dead_list_and_show(settings: Settings) -> None:
    bus = AmqpBus(settings, "test", connect_timeout_s=5).connect()
    bus.declare(service_topology(settings.prefix))
    bus.declare(site_topology(settings.prefix, "site-1"))

    def refuse(d: Delivery) -> None:
        raise Rejected(f"refused {d.msg_type} for the test")

    bus.consume(bus.names.site_queue("site-1"), refuse, prefetch=1)
    bus.publish(bus.names.tasks, "site-1", Control("abort", "job-dead"), headers={"job_id": "job-dead", "round": 3})
    deadline = time.monotonic() + 5
    while bus.dead_lettered < 1 and time.monotonic() < deadline:
        bus.process(0.05)
    bus.close()
    env = {**os.environ, "SAGMQ_AMQP_URL": settings.amqp_url, "SAGMQ_PREFIX": settings.prefix}

    def sagmq(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SAGMQ, *args], env=env, capture_output=True, text=True, timeout=60)

    listed = sagmq("dead", "list")
    assert listed.returncode == 0, listed.stderr
    assert "refused control for the test" in listed.stdout and "job-dead" in listed.stdout
    assert "1 message(s)" in listed.stdout
    ident = listed.stdout.splitlines()[1].split()[0]
    shown = sagmq("dead", "show", ident)
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["reason"] == "refused control for the test"
    assert doc["headers"]["x-sagmq-queue"] == f"{settings.prefix}.site.site-1"
    assert doc["body"] == {"command": "abort", "job_id": "job-dead", "target": ""}
    assert "1 message(s)" in sagmq("dead", "list").stdout  # browsing removed nothing
    missing = sagmq("dead", "show", "nope")
    assert missing.returncode == 1 and "no dead-lettered message" in missing.stderr


def _cli(settings: Settings) -> Any:
    env = {**os.environ, "SAGMQ_AMQP_URL": settings.amqp_url, "SAGMQ_PREFIX": settings.prefix}

    def sagmq(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SAGMQ, *args], env=env, capture_output=True, text=True, timeout=60)

    return sagmq


def _depth(bus: AmqpBus, queue: str) -> int:
    return int(bus.channel.queue_declare(queue, passive=True).method.message_count)


def test_dead_list_shows_part_of_a_bounded_queue_reads_x_death_and_purges(settings: Settings) -> None:
    bounded = dataclasses.replace(settings, dead_max_length=5)
    bus = AmqpBus(bounded, "test", connect_timeout_s=5).connect()
    try:
        bus.declare(service_topology(settings.prefix, bounded))
        bus.declare(site_topology(settings.prefix, "site-1"))
        n, ch = bus.names, bus.channel
        for i in range(4):  # sagmq's own copies, with their reason
            bus.publish_bytes(n.dead, "", b"junk", "dead", headers={"x-sagmq-reason": f"junk number {i}",
                                                                     "x-sagmq-queue": n.server_queue})
        site_q = n.site_queue("site-1")
        ch.basic_publish(n.tasks, "site-1", b"late", pika.BasicProperties(type="task", expiration="1"))
        ch.basic_publish(n.tasks, "site-1", b"refused", pika.BasicProperties(type="task"))
        wait_for(lambda: _depth(bus, site_q) <= 1, 10, "the first task to expire")
        method, _props, _body = ch.basic_get(site_q)
        ch.basic_nack(method.delivery_tag, requeue=False)  # the broker dead-letters it: x-death "rejected"
        wait_for(lambda: _depth(bus, n.dead_queue) == 5 and _depth(bus, site_q) == 0, 10, "6 dead letters, 5 kept")
    finally:
        bus.close()
    sagmq = _cli(settings)
    part = sagmq("dead", "list", "--limit", "2")
    assert part.returncode == 0, part.stderr
    assert "showing 2 of 5 message(s)" in part.stdout and "junk number 1" in part.stdout
    whole = sagmq("dead", "list").stdout
    assert "5 message(s)" in whole and "showing" not in whole
    assert "junk number 0" not in whole  # the oldest went when the bound was reached (drop-head)
    assert "expired (dead-lettered by the broker)" in whole and "rejected (dead-lettered by the broker)" in whole
    assert sum(site_q in line for line in whole.splitlines()) == 2  # x-death names the queue they left
    purged = sagmq("dead", "purge")
    assert purged.returncode == 0 and f"purged 5 message(s) from {settings.prefix}.dead" in purged.stdout
    assert "no dead-lettered messages" in sagmq("dead", "list").stdout


def test_an_expired_admin_request_never_reaches_the_dead_letter_queue(settings: Settings) -> None:
    s = dataclasses.replace(settings, rpc_timeout_s=0.3)
    admin = AdminClient(s)  # no server and no persistor are running
    try:
        with pytest.raises(SagmqError, match="is `sagmq server` running"):
            admin.status()
        n = admin.bus.names
        wait_for(lambda: _depth(admin.bus, n.server_admin_queue) == 0, 10, "the request to expire")
        with pytest.raises(SagmqError, match=r"nobody consumes .*The request was not sent"):
            admin.call("download", {"job_id": "x"}, to=RK_ADMIN_PERSISTOR)
        assert _depth(admin.bus, n.persistor_queue) == 0
        time.sleep(0.5)  # the broker dead-letters asynchronously: give it time to do so, if it would
        assert _depth(admin.bus, n.dead_queue) == 0
    finally:
        admin.close()
