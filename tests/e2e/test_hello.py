"""hello-numpy-sag end to end: through `sagmq poc`, and through separately started services."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sagmq.wire.errors import SagmqError
from tests.conftest import JOBS, SAGMQ, System

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

FINAL = np.array([[4, 5, 6], [7, 8, 9], [10, 11, 12]], dtype=np.float32)
BASE = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.float32)


def check_results(out: Path) -> None:
    model = np.load(out / "models" / "server.npy")
    assert model.dtype == np.float32
    np.testing.assert_array_equal(model, FINAL)
    for r in range(3):
        np.testing.assert_array_equal(np.load(out / "models" / f"round-{r}.npy"), BASE + r + 1)


def test_poc_runs_hello_numpy_sag(amqp_url: str, tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    env = {k: v for k, v in os.environ.items() if k != "SAGMQ_PREFIX"}
    env["SAGMQ_AMQP_URL"] = amqp_url
    p = subprocess.run([SAGMQ, "poc", "--clients", "2", "--out", str(out), "--workspace", str(tmp_path / "ws")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    check_results(out)
    for r in range(3):
        assert f"round {r}: 2 accepted" in p.stdout
    assert "[[ 4.  5.  6.]" in p.stdout
    # every process it started is gone, and its private queues were deleted
    assert "finished" in p.stdout


def test_poc_without_broker_says_how_to_start_one(tmp_path: Path) -> None:
    env = {**os.environ, "SAGMQ_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/%2F"}
    p = subprocess.run([SAGMQ, "poc", "--clients", "2", "--workspace", str(tmp_path / "ws")],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 3, p.stdout + p.stderr
    assert "rabbitmq-server -detached" in p.stderr


def test_separate_processes_submit_wait_download(system: System, tmp_path: Path) -> None:
    system.start_all(["site-1", "site-2"])
    env = {**os.environ, **system.env}

    def sagmq(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SAGMQ, *args], env=env, capture_output=True, text=True, timeout=120)

    sub = sagmq("submit", str(JOBS / "hello-numpy-sag"))
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    assert len(job_id) == 32
    w = sagmq("wait", job_id, "--timeout", "60")
    assert w.returncode == 0, w.stdout + w.stderr + system.logs()
    assert f"job {job_id} finished" in w.stdout
    listed = sagmq("list")
    assert job_id in listed.stdout and "finished" in listed.stdout
    out = tmp_path / "dl"
    d = sagmq("download", job_id[:8], "--out", str(out))
    assert d.returncode == 0, d.stderr
    check_results(out)
    history = (out / "history.json").read_text()
    assert '"round": 2' in history
    st = sagmq("status", "--json")
    assert [s["alive"] for s in json.loads(st.stdout)["sites"] if s["site"] == "site-1"] == [True], st.stdout
    human = sagmq("status")
    assert "site-1" in human.stdout and "SITES" in human.stdout, human.stdout
    # status of a job from a given round record on (what `sagmq bench` polls with), and a bad index
    tail = system.admin.status(job_id, history_from=2)
    assert tail["history_from"] == 2 and [h["round"] for h in tail["history"]] == [2]
    assert [h["round"] for h in system.admin.status(job_id)["history"]] == [0, 1, 2]
    with pytest.raises(SagmqError, match="history_from must be a round record index >= 0, not -1"):
        system.admin.status(job_id, history_from=-1)


def test_submit_refuses_invalid_job_naming_file_and_field(system: System, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(JOBS / "hello-numpy-sag", bad)
    (bad / "meta.json").write_text('{"name": "bad", "deploy_map": {"app": ["@ALL"]}, "min_clients": 0}')
    p = subprocess.run([SAGMQ, "submit", str(bad)], env={**os.environ, **system.env},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "meta.json: min_clients" in p.stderr
