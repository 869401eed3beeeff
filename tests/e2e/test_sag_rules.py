"""ScatterAndGather's rules end to end: weights, min_clients / wait / timeout, bad results."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pika
import pytest

from sagmq.job.spec import read_job_folder
from sagmq.wire.codec import DXO
from sagmq.wire.messages import TaskResult
from sagmq.wire.topology import Names
from tests.conftest import System, wait_for
from tests.e2e.jobmaker import custom_trainer, make_job, np_trainer, server_config

pytestmark = [pytest.mark.e2e, pytest.mark.broker]
BASE = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.float32)


def run_job(system: System, job: Path, sites: list[str], extra: tuple[str, ...] = (),
            timeout: float = 60) -> dict:
    return system.wait_job(system.launch(job, sites, *extra), timeout)


def final_model(system: System, job_id: str) -> np.ndarray:
    files = system.admin.download(job_id)
    import io

    return np.load(io.BytesIO(files["models/server.npy"]))


def test_weighted_weight_diff_matches_nvflare_formula(system: System, tmp_path: Path) -> None:
    weights = {"site-1": 1.0, "site-2": 2.0, "site-3": 0.5}
    deltas = {"site-1": 1.0, "site-2": 4.0, "site-3": -2.0}
    steps = {"site-1": 1, "site-2": 3, "site-3": 2}
    server = server_config({"min_clients": 3, "num_rounds": 2},
                           {"expected_data_kind": "WEIGHT_DIFF", "aggregation_weights": weights})
    apps = {s: custom_trainer(delta=deltas[s], num_steps=steps[s], kind="WEIGHT_DIFF") for s in weights}
    job = make_job(tmp_path, "weighted", server, apps, min_clients=3)
    st = run_job(system, job, list(weights), ("--allow-custom-code",))
    assert st["status"] == "finished", st
    eff = {s: weights[s] * steps[s] for s in weights}
    avg_diff = sum(eff[s] * deltas[s] for s in weights) / sum(eff.values())  # NVFlare: Σ w·x / Σ w
    expected = BASE + np.float32(2 * avg_diff)
    np.testing.assert_allclose(final_model(system, st["job_id"]), expected, rtol=1e-6)
    persistor = next(p for p in system.stack.procs if p.name == "persistor").log.read_text()
    # a WEIGHT_DIFF aggregate is not the model: the server sent the model itself
    assert persistor.count("(model.save)") == 2 and "model.commit" not in persistor, persistor


def test_slow_site_round_closes_after_wait_time(system: System, tmp_path: Path) -> None:
    server = server_config({"min_clients": 2, "num_rounds": 1, "wait_time_after_min_received": 1})
    apps = {"site-1": np_trainer(), "site-2": np_trainer(), "site-3": np_trainer(sleep_time=30)}
    st = run_job(system, make_job(tmp_path, "slow", server, apps, min_clients=3), list(apps))
    assert st["status"] == "finished", st
    (h,) = st["history"]
    assert sorted(h["aggregated"]) == ["site-1", "site-2"]
    assert "wait_time_after_min_received" in h["close_reason"]
    assert h["seconds"] < 10  # did not wait for site-3's 30 s
    np.testing.assert_array_equal(final_model(system, st["job_id"]), BASE + 1)


def test_train_timeout_closes_round_with_what_arrived(system: System, tmp_path: Path) -> None:
    server = server_config({"min_clients": 1, "num_rounds": 1, "wait_time_after_min_received": 60,
                            "train_timeout": 1.5})
    apps = {"site-1": np_trainer(), "site-2": np_trainer(sleep_time=30)}
    st = run_job(system, make_job(tmp_path, "timeout", server, apps, min_clients=2), list(apps))
    assert st["status"] == "finished", st
    (h,) = st["history"]
    assert h["aggregated"] == ["site-1"]
    assert "train_timeout" in h["close_reason"]
    np.testing.assert_array_equal(final_model(system, st["job_id"]), BASE + 1)


def test_round_with_fewer_than_min_clients_fails_the_job(system: System, tmp_path: Path) -> None:
    server = server_config({"min_clients": 2, "num_rounds": 1, "train_timeout": 1.5})
    apps = {"site-1": np_trainer(), "site-2": np_trainer(sleep_time=30)}
    st = run_job(system, make_job(tmp_path, "toofew", server, apps, min_clients=2), list(apps))
    assert st["status"] == "failed"
    assert "fewer than min_clients=2" in st["reason"] and "train_timeout" in st["reason"]


def test_too_few_sites_connected_fails_the_job(system: System, tmp_path: Path) -> None:
    server = server_config({"min_clients": 3, "num_rounds": 1})
    apps = {s: np_trainer() for s in ("site-1", "site-2", "site-3")}
    job = make_job(tmp_path, "nosites", server, apps, min_clients=3)
    system.env["SAGMQ_SCHEDULE_TIMEOUT_S"] = "2"
    st = run_job(system, job, ["site-1", "site-2"])
    assert st["status"] == "failed"
    assert "only 2 site(s) connected" in st["reason"] and "min_clients=3" in st["reason"]


def _inject(system: System, result: TaskResult) -> None:
    """Publish a result straight to the broker, as a misbehaving site would."""
    conn = pika.BlockingConnection(pika.URLParameters(system.settings.amqp_url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        props = pika.BasicProperties(type="result", delivery_mode=2, user_id="guest",
                                     headers={"site": result.site, "job_id": result.job_id, "round": result.round})
        ch.basic_publish(Names(system.settings.prefix).results, "result", result.encode(), props, mandatory=True)
    finally:
        conn.close()


def _dead_reasons(system: System) -> list[str]:
    conn = pika.BlockingConnection(pika.URLParameters(system.settings.amqp_url))
    out = []
    try:
        ch = conn.channel()
        while True:
            method, props, _ = ch.basic_get(Names(system.settings.prefix).dead_queue, auto_ack=True)
            if method is None:
                return out
            out.append(props.headers["x-sagmq-reason"])
    finally:
        conn.close()


def test_duplicate_stale_and_wrong_kind_results_are_rejected(system: System, tmp_path: Path) -> None:
    server = server_config({"min_clients": 2, "num_rounds": 2})
    apps = {"site-1": np_trainer(), "site-2": np_trainer(sleep_time=2)}
    job = make_job(tmp_path, "hostile", server, apps, min_clients=2)
    job_id = system.launch(job, list(apps))

    def round1_has_site1() -> bool:
        st = system.admin.status(job_id)
        return st.get("current_round") == 1 and "site-1" in (st.get("open_round") or {}).get("accepted", [])

    wait_for(round1_has_site1, 30, "site-1's round-1 result")
    task_id = system.admin.status(job_id)["open_round"]["task_id"]
    poison = {"numpy_key": np.full((3, 3), 1000, np.float32)}
    base = dict(job_id=job_id, task_name="train", task_id=task_id, site="site-1", rc="OK")
    _inject(system, TaskResult(**base, round=1, dxo=DXO("WEIGHTS", poison, {})))  # duplicate
    _inject(system, TaskResult(**base, round=0, dxo=DXO("WEIGHTS", poison, {})))  # stale round
    _inject(system, TaskResult(**base, round=1, dxo=DXO("WEIGHT_DIFF", poison, {})))  # wrong kind
    forged = {**base, "task_id": "forged"}
    _inject(system, TaskResult(**forged, round=1, dxo=DXO("WEIGHTS", poison, {})))  # another task
    st = system.wait_job(job_id, 30)
    assert st["status"] == "finished", st
    np.testing.assert_array_equal(final_model(system, job_id), BASE + 2)
    reasons = [x["reason"] for x in st["history"][1]["rejected"]]
    assert any("duplicate" in r for r in reasons), reasons
    assert any("expected data kind WEIGHTS but got WEIGHT_DIFF" in r for r in reasons), reasons
    dead = _dead_reasons(system)
    assert any("stale or wrong round: result for round 0, round 1 is open" in r for r in dead), dead
    assert any("result for task forged, not the current task" in r for r in dead), dead
    assert sum("duplicate" in r for r in dead) == 1 and any("WEIGHT_DIFF" in r for r in dead), dead
    assert st["history"][1]["aggregated"] == ["site-1", "site-2"]


def test_custom_code_runs_only_where_allowed(system: System, tmp_path: Path) -> None:
    from tests.conftest import JOBS

    job = JOBS / "hello-numpy-sag-custom"
    system.start_core()
    system.start_client("site-1", "--allow-custom-code")
    system.start_client("site-2")
    system.wait_sites(["site-1", "site-2"])
    st = system.wait_job(system.admin.submit(read_job_folder(job)), 30)
    assert st["status"] == "failed"
    assert "site-2 refused the job" in st["reason"] and "--allow-custom-code" in st["reason"]
    # the admin sees why; now with both sites allowing custom code the same job runs
    system.stack.stop(system.stack.procs[-1])
    system.start_client("site-2", "--allow-custom-code")
    time.sleep(0.5)
    system.wait_sites(["site-1", "site-2"])
    st = system.wait_job(system.admin.submit(read_job_folder(job)), 30)
    assert st["status"] == "finished", st
    np.testing.assert_array_equal(final_model(system, st["job_id"]), BASE + 3)


def test_abort_stops_running_job_and_next_queued_job_runs(system: System, tmp_path: Path) -> None:
    from tests.conftest import JOBS

    slow = make_job(tmp_path, "slow", server_config({"min_clients": 2, "num_rounds": 1}),
                    {"site-1": np_trainer(sleep_time=60), "site-2": np_trainer(sleep_time=60)}, min_clients=2)
    system.start_core()
    for s in ("site-1", "site-2"):
        system.start_client(s)
    system.wait_sites(["site-1", "site-2"])
    first = system.admin.submit(read_job_folder(slow))
    second = system.admin.submit(read_job_folder(JOBS / "hello-numpy-sag"))
    wait_for(lambda: system.admin.status(first)["status"] == "running", 20, "the first job to run")
    assert system.admin.status(second)["status"] == "submitted"
    system.admin.call("abort", {"job_id": first})
    t0 = time.monotonic()
    st = system.wait_job(second, 40)
    assert st["status"] == "finished", st
    assert time.monotonic() - t0 < 30  # the sites stopped the aborted training
    assert system.admin.status(first)["status"] == "aborted"
    np.testing.assert_array_equal(final_model(system, second), BASE + 3)


STALL = """
from sagmq.client.api import DXO, NUM_STEPS_CURRENT_ROUND, RC_TASK_ABORTED, WEIGHTS, Executor, TaskError


class Stall(Executor):
    def __init__(self, from_round=0, **_):
        self.from_round = from_round

    def execute(self, task_name, dxo, ctx):
        if ctx.round >= self.from_round and ctx.abort.wait(600):
            raise TaskError(RC_TASK_ABORTED, "aborted")
        return DXO(WEIGHTS, {k: v + v.dtype.type(1) for k, v in dxo.data.items()}, {NUM_STEPS_CURRENT_ROUND: 1})
"""


def test_an_aborted_job_keeps_every_applied_round(system: System, tmp_path: Path) -> None:
    """Small rounds are committed by the next round's opening, not each by a model.commit: the last
    round applied before an abort still gets saved, and so does every round before it."""
    import io

    server = server_config({"min_clients": 2, "num_rounds": 100})
    stall = {"format_version": 2, "executors": [{"tasks": ["train"], "executor": {"path": "stall.Stall",
                                                                                  "args": {"from_round": 20}}}]}
    apps = {"site-1": stall, "site-2": stall}
    job = make_job(tmp_path, "abortfast", server, apps, min_clients=2)
    for app in ("app_site_1", "app_site_2"):
        (job / app / "custom").mkdir()
        (job / app / "custom" / "stall.py").write_text(STALL)
    job_id = system.launch(job, list(apps), "--allow-custom-code")
    # rounds 0-19 take milliseconds; round 20 waits for the abort
    wait_for(lambda: len(system.admin.status(job_id)["history"]) >= 20, 60, "20 rounds done")
    system.admin.call("abort", {"job_id": job_id})
    st = system.wait_job(job_id, 30)
    assert st["status"] == "aborted", st
    assert [h["round"] for h in st["history"] if "aggregated" in h] == list(range(20))
    files: dict[str, bytes] = {}

    def saved() -> bool:
        files.update(system.admin.download(job_id))
        return "models/round-19.npy" in files

    wait_for(saved, 20, "round 19's snapshot")
    np.testing.assert_array_equal(np.load(io.BytesIO(files["models/server.npy"])), BASE + 20)
    for r in range(20):
        np.testing.assert_array_equal(np.load(io.BytesIO(files[f"models/round-{r}.npy"])), BASE + r + 1)
    persistor = next(p for p in system.stack.procs if p.name == "persistor").log.read_text()
    implied = persistor.count("(committed by the next round's aggregate)")
    assert 10 <= implied < 20 and persistor.count("(model.commit of its aggregate)") == 20 - implied, persistor
