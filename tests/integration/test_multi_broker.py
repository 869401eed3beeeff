"""SAGMQ_AMQP_URL with two brokers: when the first is lost, the bus reconnects to the next that answers."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from sagmq.amqp import AmqpBus
from sagmq.wire.settings import Settings
from sagmq.wire.topology import service_topology
from tests.brokernode import running_node
from tests.integration.test_queue_args import queue_depth

pytestmark = [pytest.mark.broker]


def test_the_bus_moves_to_the_next_url_when_its_broker_dies(settings: Settings, tmp_path: Path) -> None:
    with running_node(base_dir=tmp_path / "node") as node:
        s = replace(settings, amqp_url=f"{node.url},{settings.amqp_url}")
        bus = AmqpBus(s, "multi", connect_timeout_s=30).connect()
        try:
            bus.declare(service_topology(s.prefix, s))
            assert f"{s.prefix}.server" in node.ctl("list_queues", "name").stdout  # on the first node
            assert queue_depth(settings, f"{s.prefix}.server") is None  # not on the second
            node.kill()
            deadline = time.monotonic() + 30
            while queue_depth(settings, f"{s.prefix}.server") is None:  # redeclared there after the reconnect
                assert time.monotonic() < deadline, "the bus did not move to the second broker"
                bus.process(0.2)
            assert not bus.broken()
            bus.publish_bytes(bus.names.events, "model.load", b"x", "model.load")  # confirmed by the second
            assert queue_depth(settings, f"{s.prefix}.persistor") == 1
        finally:
            bus.close()
