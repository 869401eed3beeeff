"""Transient tasks (delivery mode 1) under a broker restart, on a private RabbitMQ node.

A round's task travels transient: a restarted broker drops it instead of reading it back from
disk. The round's re-send rule must then bring it to the site again (after a reconnect, a target
that owes an answer and stays idle for three heartbeats gets the whole task), so the job still
ends with the exact model.
"""

from __future__ import annotations

import io
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sagmq.wire.errors import SagmqError
from sagmq.wire.settings import load_settings
from tests.brokernode import RabbitNode, running_node
from tests.conftest import System
from tests.e2e.jobmaker import make_job, np_trainer, server_config

pytestmark = [pytest.mark.broker, pytest.mark.e2e]
BASE = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.float32)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    with running_node(base_dir=tmp_path_factory.mktemp("node")) as n:
        yield n


@pytest.fixture
def system(node: RabbitNode, tmp_path: Path) -> Iterator[System]:
    settings = load_settings({"SAGMQ_AMQP_URL": node.url, "SAGMQ_PREFIX": f"t-{uuid.uuid4().hex[:8]}",
                              "SAGMQ_WORKSPACE": str(tmp_path / "ws"), "SAGMQ_RPC_TIMEOUT_S": "5"})
    s = System(settings, tmp_path)
    s.env["SAGMQ_AMQP_HEARTBEAT_S"] = "2"
    s.env["SAGMQ_CLIENT_TIMEOUT_S"] = "60"  # the stopped site stays a target of the next round
    try:
        yield s
    finally:
        s.close()


def poll(fn: Any, timeout: float, what: str) -> Any:
    """Wait for fn() to be truthy; a broker that is away (restarting) is not a failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
        except SagmqError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def log_of(system: System, name: str) -> str:
    return next(p for p in system.stack.procs if p.name == name).log.read_text()


def ended(system: System, job_id: str) -> dict[str, Any] | None:
    st = system.admin.status(job_id)
    return st if st["status"] in ("finished", "failed", "aborted") else None


@pytest.mark.parametrize("forward", [False, True], ids=["whole-task", "forwarded-aggregate"])
def test_transient_task_lost_in_broker_restart_is_sent_again(system: System, node: RabbitNode, tmp_path: Path,
                                                             forward: bool) -> None:
    # forward: every aggregate goes to the sites too, and the round-1 task only names it
    system.env["SAGMQ_FORWARD_MIN_BYTES"] = "1" if forward else str(1 << 30)
    server = server_config({"min_clients": 2, "num_rounds": 3})
    apps = {"site-1": np_trainer(sleep_time=4), "site-2": np_trainer()}
    job_id = system.launch(make_job(tmp_path, "transient", server, apps, min_clients=2), list(apps))
    site2 = next(p for p in system.stack.procs if p.name == "site-2")
    # site-1 takes 4 s a round: site-2 is stopped while round 0 waits for site-1
    poll(lambda: f"site-2 ACCEPTED at round 0 of job {job_id}" in log_of(system, "aggregator"), 30,
         "site-2's round-0 result")
    site2.popen.send_signal(signal.SIGSTOP)  # round 1's task reaches its queue (or socket) but is never run
    try:
        poll(lambda: system.admin.status(job_id).get("current_round") == 1, 30, "round 1 to open")
        time.sleep(0.5)  # the task is confirmed in memory only
        node.restart()  # the broker drops every transient message: site-2's task is gone
    finally:
        site2.popen.send_signal(signal.SIGCONT)
    st = poll(lambda: ended(system, job_id), 120, "the job to end after the restart")
    assert st["status"] == "finished", f"{st['reason']}\n{system.logs()}"
    assert [sorted(h["accepted"]) for h in st["history"]] == [["site-1", "site-2"]] * 3, system.logs()
    model = np.load(io.BytesIO(system.admin.download(job_id)["models/server.npy"]))
    np.testing.assert_array_equal(model, BASE + 3)
    # the re-send path, not a copy the broker kept, brought the task back
    assert "site-2 is idle after a reconnect" in log_of(system, "server"), system.logs()
    assert not system.stack.dead(), system.logs()
