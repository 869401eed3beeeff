"""One fault at a time, the way containers and operators cause them (issue 11): a site back before it
was missed, a server killed again and again between its writes. The job ends with the exact model and
every round exactly once in its history."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sagmq.wire.errors import SagmqError
from tests.conftest import System, wait_for
from tests.e2e.jobmaker import make_job, np_trainer, server_config

pytestmark = [pytest.mark.e2e, pytest.mark.broker]
BASE = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.float32)


def proc(system: System, name: str) -> Any:
    return next(p for p in reversed(system.stack.procs) if p.name == name)


def downloaded(system: System, job_id: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The job's final model and history.json, as `sagmq download` writes them."""
    files = system.admin.download(job_id)
    return np.load(io.BytesIO(files["models/server.npy"])), json.loads(files["history.json"])


def status(system: System, job_id: str) -> dict[str, Any]:
    """The job's status; {} while the server restarts."""
    try:
        return system.admin.status(job_id)
    except SagmqError:
        return {}


def test_a_site_killed_mid_round_and_back_before_it_was_missed_gets_its_task_again(
        system: System, tmp_path: Path) -> None:
    # the site is never silent for SAGMQ_CLIENT_TIMEOUT_S (30 s here); with min_clients 2 and a long
    # train_timeout only its task sent again (after three 0.3 s heartbeats idle) closes the round
    system.env["SAGMQ_CLIENT_TIMEOUT_S"] = "30"
    server = server_config({"min_clients": 2, "num_rounds": 4, "train_timeout": 6000})
    apps = {"site-1": np_trainer(sleep_time=2), "site-2": np_trainer(sleep_time=2)}
    job_id = system.launch(make_job(tmp_path, "siteback", server, apps, min_clients=2), list(apps))

    def site_1_training() -> bool:  # its task reached it (a task still in its queue would survive the kill)
        sites = system.admin.status().get("sites", [])
        return any(x["site"] == "site-1" and x["busy_job"] == job_id for x in sites)

    wait_for(site_1_training, 20, "site-1 to run its task")
    system.stack.kill(proc(system, "site-1"))  # it had acked the task: the task goes with it
    time.sleep(1)  # `restart: unless-stopped`: back a second later
    system.start_client("site-1")
    st = system.wait_job(job_id, 60)
    assert st["status"] == "finished", st
    assert [h["round"] for h in st["history"]] == [0, 1, 2, 3], st["history"]
    assert all(sorted(h["aggregated"]) == ["site-1", "site-2"] for h in st["history"]), st["history"]
    # a few heartbeats after its return, not the 30 s after which the old rule sent the task again
    assert st["history"][0]["seconds"] < 20, st["history"][0]
    model, history = downloaded(system, job_id)
    np.testing.assert_array_equal(model, BASE + 4)
    assert [h["round"] for h in history] == [0, 1, 2, 3]


def test_a_server_killed_at_rounds_3_6_and_9_loses_no_round_record(system: System, tmp_path: Path) -> None:
    # each restarted server's jobs.json lags (written at most once a second); the persistor's records and
    # the history merged by round keep every round, once
    server = server_config({"min_clients": 2, "num_rounds": 12})
    apps = {"site-1": np_trainer(sleep_time=0.5), "site-2": np_trainer(sleep_time=0.5)}
    job_id = system.launch(make_job(tmp_path, "serverkills", server, apps, min_clients=2), list(apps))
    for r in (3, 6, 9):
        wait_for(lambda r=r: (status(system, job_id).get("current_round") or 0) >= r, 60, f"round {r}")
        system.stack.kill(proc(system, "server"))
        system.stack.start("server", "server")
    st = wait_for(lambda: (lambda s: s if s.get("status") in ("finished", "failed", "aborted") else None)(
        status(system, job_id)), 90, f"job {job_id} to end", 0.1)
    assert st["status"] == "finished", st
    model, history = downloaded(system, job_id)
    np.testing.assert_array_equal(model, BASE + 12)
    assert [h["round"] for h in history] == list(range(12)), history
    assert [h["round"] for h in st["history"]] == list(range(12)), st["history"]  # the server's copy too
