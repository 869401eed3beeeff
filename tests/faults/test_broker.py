"""Broker-level faults on a private RabbitMQ node: a restart mid-job, a network partition between
a site and the broker, and a round held open longer than the broker's consumer_timeout."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sagmq.job.spec import read_job_folder
from sagmq.wire.errors import SagmqError
from sagmq.wire.settings import load_settings
from tests.brokernode import RabbitNode, running_node
from tests.conftest import System
from tests.e2e.jobmaker import make_job, np_trainer, server_config
from tests.faults.tcpproxy import Proxy

pytestmark = [pytest.mark.broker, pytest.mark.e2e]
BASE = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.float32)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    # consumer_timeout at its 1-minute minimum, so a long round outlives it
    with running_node(config=["consumer_timeout = 60000"], base_dir=tmp_path_factory.mktemp("node")) as n:
        yield n


@pytest.fixture
def system(node: RabbitNode, tmp_path: Path) -> Iterator[System]:
    settings = load_settings({"SAGMQ_AMQP_URL": node.url, "SAGMQ_PREFIX": f"f-{uuid.uuid4().hex[:8]}",
                              "SAGMQ_WORKSPACE": str(tmp_path / "ws"), "SAGMQ_RPC_TIMEOUT_S": "5"})
    s = System(settings, tmp_path)
    s.env["SAGMQ_AMQP_HEARTBEAT_S"] = "2"
    try:
        yield s
    finally:
        s.close()


def poll(fn: Any, timeout: float, what: str) -> Any:
    """Like wait_for, but a broker that is away (restarting) is not a failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
        except SagmqError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def ended(system: System, job_id: str) -> dict | None:
    st = system.admin.status(job_id)
    return st if st["status"] in ("finished", "failed", "aborted") else None


def final(system: System, job_id: str) -> np.ndarray:
    return np.load(io.BytesIO(system.admin.download(job_id)["models/server.npy"]))


def test_broker_restart_mid_job(system: System, node: RabbitNode, tmp_path: Path) -> None:
    server = server_config({"min_clients": 2, "num_rounds": 4})
    apps = {"site-1": np_trainer(sleep_time=1), "site-2": np_trainer(sleep_time=1)}
    job = make_job(tmp_path, "restart", server, apps, min_clients=2)
    job_id = system.launch(job, list(apps))
    poll(lambda: len(system.admin.status(job_id)["history"]) >= 1 and
         system.admin.status(job_id).get("phase") == "training", 30, "round 1 under way")
    node.restart()  # every connection drops; durable queues and persistent messages come back
    st = poll(lambda: ended(system, job_id), 180, "the job to end after the restart")
    assert st["status"] == "finished", f"{st['reason']}\n{system.logs()}"
    assert [h["round"] for h in st["history"]] == [0, 1, 2, 3]
    np.testing.assert_array_equal(final(system, job_id), BASE + 4)
    assert not system.stack.dead(), system.logs()


def test_network_partition_between_a_site_and_the_broker(system: System, node: RabbitNode,
                                                          tmp_path: Path) -> None:
    proxy = Proxy(int(node.url.rsplit(":", 1)[1].split("/")[0]))
    try:
        server = server_config({"min_clients": 2, "num_rounds": 3})
        apps = {"site-1": np_trainer(), "site-2": np_trainer(sleep_time=1)}
        job = make_job(tmp_path, "partition", server, apps, min_clients=2)
        system.env["SAGMQ_CLIENT_TIMEOUT_S"] = "60"  # the round waits for the cut-off site
        system.start_core()
        system.start_client("site-1")
        system.start_client("site-2", env={"SAGMQ_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F"})
        system.wait_sites(list(apps))
        job_id = system.admin.submit(read_job_folder(job))
        poll(lambda: system.admin.status(job_id).get("current_round") == 1, 30, "round 1")
        proxy.cut()  # site-2 is training; its result and heartbeats vanish
        time.sleep(8)  # heartbeats (2 s) notice on both sides
        proxy.restore()
        st = poll(lambda: ended(system, job_id), 120, "the job to end after the partition")
        assert st["status"] == "finished", f"{st['reason']}\n{system.logs()}"
        assert all(sorted(h["aggregated"]) == ["site-1", "site-2"] for h in st["history"])
        np.testing.assert_array_equal(final(system, job_id), BASE + 3)
        site2 = next(p for p in system.stack.procs if p.name == "site-2").log.read_text()
        assert "reconnecting" in site2
    finally:
        proxy.close()


def test_round_longer_than_consumer_timeout_completes(system: System, tmp_path: Path) -> None:
    # site-1 answers at once; its result stays unacked in the aggregator while site-2 trains for
    # longer than the broker's consumer_timeout (60 s, checked once a minute).
    server = server_config({"min_clients": 2, "num_rounds": 1})
    apps = {"site-1": np_trainer(), "site-2": np_trainer(sleep_time=130)}
    job = make_job(tmp_path, "long", server, apps, min_clients=2)
    job_id = system.launch(job, list(apps))
    st = poll(lambda: ended(system, job_id), 240, "the long round to end")
    assert st["status"] == "finished", f"{st['reason']}\n{system.logs()}"
    assert sorted(st["history"][0]["aggregated"]) == ["site-1", "site-2"]
    np.testing.assert_array_equal(final(system, job_id), BASE + 1)
