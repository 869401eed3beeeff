"""The server takes aggregates only from the aggregator's user (or its own, in a one-user setup)."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pika

from sagmq.amqp import AmqpBus
from sagmq.server.main import ServerService
from sagmq.wire.codec import DXO
from sagmq.wire.messages import RoundAggregated
from sagmq.wire.settings import Settings
from sagmq.wire.topology import RK_ROUND_AGGREGATED
from tests.conftest import service_thread


def test_an_aggregate_from_another_user_is_dead_lettered(settings: Settings) -> None:
    # the server runs as user "server" with the default aggregator user "aggregator"; the test broker's
    # connection is guest, so the aggregate below arrives with user_id "guest"
    own = replace(settings, amqp_url=settings.amqp_url.replace("guest:guest@", "server:x@"))
    with service_thread("server", settings, lambda bus: ServerService(own, bus), lambda svc, bus: svc.run()):
        test = AmqpBus(settings, "test", connect_timeout_s=5).connect()
        n = test.names
        agg = RoundAggregated("a" * 32, 0, ["site-1"], DXO("WEIGHTS", {"w": np.ones(3, np.float32)}, {}), "t0")
        props = pika.BasicProperties(type=RoundAggregated.TYPE, delivery_mode=2, user_id="guest")
        test.channel.basic_publish(n.events, RK_ROUND_AGGREGATED, agg.encode(), props, mandatory=True)
        deadline = time.monotonic() + 10
        method = None
        while method is None and time.monotonic() < deadline:
            method, p, _ = test.channel.basic_get(n.dead_queue, auto_ack=True)
            time.sleep(0.05)
        assert method is not None, "nothing was dead-lettered"
        assert "spoofed sender: user 'guest' sent an aggregate" in p.headers["x-sagmq-reason"]
        assert "'aggregator'" in p.headers["x-sagmq-reason"]
        test.close()
