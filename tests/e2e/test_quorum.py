"""hello-numpy-sag with SAGMQ_QUEUE_TYPE=quorum: every durable queue a quorum queue, confirms and
dead-lettering as with classic ones (a single node hosts quorum queues too)."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pika
import pytest

from sagmq.wire.settings import Settings
from tests.conftest import JOBS, System, wait_for
from tests.integration.test_queue_args import queue_types

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

FINAL = np.array([[4, 5, 6], [7, 8, 9], [10, 11, 12]], dtype=np.float32)


def test_hello_numpy_sag_on_quorum_queues(settings: Settings, tmp_path: Path) -> None:
    s = replace(settings, queue_type="quorum")
    system = System(s, tmp_path)
    system.env["SAGMQ_QUEUE_TYPE"] = "quorum"
    try:
        job_id = system.launch(JOBS / "hello-numpy-sag", ["site-1", "site-2"])
        assert system.wait_job(job_id, 90)["status"] == "finished", system.logs()
        model = np.load(io.BytesIO(system.admin.download(job_id)["models/server.npy"]))
        np.testing.assert_array_equal(model, FINAL)
        n = system.admin.bus.names
        types = queue_types(s.prefix)
        assert types[n.server_queue] == types[n.dead_queue] == types[n.site_queue("site-1")] == "quorum", types
        # a message the server cannot process is dead-lettered into the (quorum) dead queue
        conn = pika.BlockingConnection(pika.URLParameters(s.amqp_url))
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            ch.basic_publish(n.events, "contribution", b"\xc1 not msgpack",
                             pika.BasicProperties(type="contribution", user_id="guest", delivery_mode=2))
            wait_for(lambda: ch.queue_declare(n.dead_queue, passive=True).method.message_count >= 1, 20,
                     "the junk message in the dead queue")
        finally:
            conn.close()
    finally:
        system.close()
