"""Real SIGKILLs mid-job: client, aggregator, server and persistor; the job still ends right."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import System, wait_for
from tests.e2e.jobmaker import make_job, np_trainer, server_config

pytestmark = [pytest.mark.e2e, pytest.mark.broker]
BASE = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.float32)


def proc(system: System, name: str):
    return next(p for p in reversed(system.stack.procs) if p.name == name)


def model(system: System, job_id: str, name: str = "models/server.npy") -> np.ndarray:
    return np.load(io.BytesIO(system.admin.download(job_id)[name]))


def rounds_once(st: dict, n: int) -> None:
    assert [h["round"] for h in st["history"]] == list(range(n)), st["history"]


def test_client_killed_mid_round_rejoins_next_round(system: System, tmp_path: Path) -> None:
    server = server_config({"min_clients": 1, "num_rounds": 3, "wait_time_after_min_received": 4})
    apps = {"site-1": np_trainer(), "site-2": np_trainer(sleep_time=2)}
    job_id = system.launch(make_job(tmp_path, "clientkill", server, apps, min_clients=2), list(apps))
    wait_for(lambda: system.admin.status(job_id).get("phase") == "training", 20, "round 0 to start")

    def site_2_training() -> bool:  # its task reached it (a task still in its queue would survive the kill)
        sites = system.admin.status().get("sites", [])
        return any(x["site"] == "site-2" and x["busy_job"] == job_id for x in sites)

    wait_for(site_2_training, 20, "site-2 to run its task")
    system.stack.kill(proc(system, "site-2"))  # mid-training: its task is lost with it
    system.start_client("site-2")
    st = system.wait_job(job_id, 60)
    assert st["status"] == "finished", st
    rounds_once(st, 3)
    # back while round 0 waits, site-2 may get its task again there (after 3 heartbeats idle) or not
    assert sorted(st["history"][0]["aggregated"]) in (["site-1"], ["site-1", "site-2"]), st["history"]
    assert all(sorted(h["aggregated"]) == ["site-1", "site-2"] for h in st["history"][1:]), st["history"]
    np.testing.assert_array_equal(model(system, job_id), BASE + 3)


def test_aggregator_killed_mid_round_rebuilds_from_redelivered_results(system: System, tmp_path: Path) -> None:
    server = server_config({"min_clients": 3, "num_rounds": 2},
                           {"expected_data_kind": "WEIGHTS", "aggregation_weights": {"site-1": 1, "site-2": 3,
                                                                                     "site-3": 1}})
    apps = {"site-1": np_trainer(delta=1), "site-2": np_trainer(delta=5), "site-3": np_trainer(delta=3,
                                                                                              sleep_time=3)}
    job_id = system.launch(make_job(tmp_path, "aggkill", server, apps, min_clients=3), list(apps))

    def two_accepted_in_round_1() -> bool:
        st = system.admin.status(job_id)
        return st.get("current_round") == 1 and len((st.get("open_round") or {}).get("accepted", [])) == 2

    wait_for(two_accepted_in_round_1, 30, "two results of round 1")
    system.stack.kill(proc(system, "aggregator"))
    system.stack.start("aggregator", "aggregator")
    st = system.wait_job(job_id, 60)
    assert st["status"] == "finished", st
    rounds_once(st, 2)
    assert sorted(st["history"][1]["aggregated"]) == ["site-1", "site-2", "site-3"]
    step = np.float32((1 * 1 + 3 * 5 + 1 * 3) / 5)  # weighted mean of the deltas
    np.testing.assert_allclose(model(system, job_id), BASE + 2 * step, rtol=1e-6)


def test_server_killed_mid_job_resumes_from_last_saved_round(system: System, tmp_path: Path) -> None:
    server = server_config({"min_clients": 2, "num_rounds": 4})
    apps = {"site-1": np_trainer(sleep_time=1), "site-2": np_trainer(sleep_time=1)}
    job_id = system.launch(make_job(tmp_path, "serverkill", server, apps, min_clients=2), list(apps))
    wait_for(lambda: len(system.admin.status(job_id)["history"]) >= 2, 30, "two rounds done")
    system.stack.kill(proc(system, "server"))
    system.stack.start("server", "server")
    st = system.wait_job(job_id, 60)
    assert st["status"] == "finished", st
    assert st["job_id"] == job_id
    rounds_once(st, 4)  # none skipped, none applied twice
    np.testing.assert_array_equal(model(system, job_id), BASE + 4)
    for r in range(4):
        np.testing.assert_array_equal(model(system, job_id, f"models/round-{r}.npy"), BASE + r + 1)
    listed = system.admin.call("list").result["jobs"]
    assert [(j["job_id"], j["status"]) for j in listed] == [(job_id, "finished")]


def test_persistor_killed_mid_job_saves_are_redelivered(system: System, tmp_path: Path) -> None:
    server = server_config({"min_clients": 2, "num_rounds": 4})
    apps = {"site-1": np_trainer(sleep_time=0.7), "site-2": np_trainer(sleep_time=0.7)}
    job_id = system.launch(make_job(tmp_path, "persistorkill", server, apps, min_clients=2), list(apps))
    wait_for(lambda: len(system.admin.status(job_id)["history"]) >= 1, 30, "round 0 done")
    system.stack.kill(proc(system, "persistor"))
    wait_for(lambda: system.admin.status(job_id).get("phase") == "saving", 30, "a save with no persistor")
    system.stack.start("persistor", "persistor")
    st = system.wait_job(job_id, 60)
    assert st["status"] == "finished", st
    rounds_once(st, 4)
    np.testing.assert_array_equal(model(system, job_id), BASE + 4)
