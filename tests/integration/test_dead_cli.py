"""`sagmq dead list` and `sagmq dead show` read the dead-letter queue without emptying it."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from sagmq.amqp import AmqpBus
from sagmq.wire.bus import Delivery
from sagmq.wire.errors import Rejected
from sagmq.wire.messages import Control
from sagmq.wire.settings import Settings
from sagmq.wire.topology import service_topology, site_topology
from tests.conftest import SAGMQ

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
