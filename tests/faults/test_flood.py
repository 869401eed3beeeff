"""A flood of junk into the services' queues: the honest job is delayed by seconds, the dead-letter
queue stays within its bound, the server's memory stays bounded, and the logs do not grow a line per
junk message."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pika
import psutil
import pytest

from sagmq.job.spec import read_job_folder
from sagmq.wire.settings import Settings
from sagmq.wire.topology import Names
from tests.conftest import JOBS, System, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

FINAL = np.array([[4, 5, 6], [7, 8, 9], [10, 11, 12]], dtype=np.float32)
MIB = 2**20


@contextmanager
def raw_channel(settings: Settings) -> Iterator[Any]:
    """A plain pika channel without confirms: junk goes out as fast as the socket takes it."""
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        yield conn.channel()
    finally:
        conn.close()


def flood(settings: Settings, queue: str, n: int, size: int, msg_type: str) -> None:
    """n junk messages of size bytes straight into a queue (through the default exchange)."""
    body = os.urandom(size)
    props = pika.BasicProperties(type=msg_type, delivery_mode=1)
    with raw_channel(settings) as ch:
        for _ in range(n):
            ch.basic_publish("", queue, body, props)


def depth(settings: Settings, queue: str) -> int:
    with raw_channel(settings) as ch:
        return int(ch.queue_declare(queue, passive=True).method.message_count)


class DepthWatch:
    """Samples a queue's depth every 0.1 s in a thread; keeps the largest seen."""

    def __init__(self, settings: Settings, queue: str) -> None:
        self.settings, self.queue, self.most = settings, queue, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with raw_channel(self.settings) as ch:
            while not self._stop.wait(0.1):
                self.most = max(self.most, int(ch.queue_declare(self.queue, passive=True).method.message_count))

    def __enter__(self) -> DepthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def log_lines(system: System) -> dict[str, int]:
    return {p.name: len(p.log.read_text(errors="replace").splitlines()) for p in system.stack.procs}


def test_a_flood_of_junk_delays_the_honest_job_by_seconds(system: System) -> None:
    s, n = system.settings, Names(system.settings.prefix)
    system.env["SAGMQ_CLIENT_TIMEOUT_S"] = "10"  # the sites' heartbeats queue behind the junk too
    system.start_all(["site-1", "site-2"])
    junk = 10_000  # per queue: 20,000 in all
    bound = s.dead_max_length  # the services' default (10,000): half of it is there already
    flood(s, n.dead_queue, bound // 2, 200, "dead")
    flood(s, n.results_queue, junk, 200, "result")  # undecodable results for the aggregator
    flood(s, n.server_queue, junk, 200, "client.heartbeat")  # undecodable heartbeats for the server
    with DepthWatch(s, n.dead_queue) as dead:
        t0 = time.monotonic()
        job_id = system.admin.submit(read_job_folder(JOBS / "hello-numpy-sag"))
        wait_for(lambda: system.admin.status(job_id)["history"], 30, "round 0 to end", 0.1)
        round_0_s = time.monotonic() - t0
        st = system.wait_job(job_id, 60)
        wait_for(lambda: depth(s, n.results_queue) == 0 and depth(s, n.server_queue) == 0, 30, "the junk to go")
    assert st["status"] == "finished", (st, system.logs())
    assert [h["round"] for h in st["history"]] == [0, 1, 2]
    np.testing.assert_array_equal(np.load(io.BytesIO(system.admin.download(job_id)["models/server.npy"])), FINAL)
    print(f"round 0 took {round_0_s:.1f} s behind {2 * junk} junk messages")
    assert round_0_s < 10, f"round 0 took {round_0_s:.1f} s behind {2 * junk} junk messages"  # a few s per 10,000
    assert dead.most <= bound and depth(s, n.dead_queue) == bound, (dead.most, bound)  # the oldest dropped
    lines = log_lines(system)
    assert lines["server"] < 100 and lines["aggregator"] < 100, lines  # not one a junk message


def test_large_junk_does_not_pile_up_in_the_servers_memory(system: System) -> None:
    """The server holds at most its prefetch: room for two of the largest multi-part messages (64 MiB here:
    5 parts each) and 32 more, so 42 junk messages of 1 MiB at most, where it used to pull all 200."""
    s, n = system.settings, Names(system.settings.prefix)
    system.env["SAGMQ_MAX_MODEL_BYTES"] = str(64 * MIB)
    system.start_all(["site-1"])
    server = psutil.Process(next(p for p in system.stack.procs if p.name == "server").popen.pid)
    before = server.memory_info().rss
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], server.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        flood(s, n.server_queue, 200, MIB, "contribution")
        wait_for(lambda: depth(s, n.server_queue) == 0, 60, "the server to take the junk")
        wait_for(lambda: depth(s, n.dead_queue) >= 200, 30, "the junk to be dead-lettered")
    finally:
        stop.set()
        sampler.join(5)
    assert peak[0] < 120 * MIB, f"server RSS {before / MIB:.0f} MB -> peak {peak[0] / MIB:.0f} MB"
    assert system.alive_sites() == {"site-1"}  # still serving
