"""`docker compose up` for real: the one-shot job, healthchecks, scaled sites (docker-compose.yml)."""

from __future__ import annotations

import os

import numpy as np

from tests.deploy.stack import SERVICES, Stack, expected_model, make_job


def test_up_exit_code_from_job_writes_the_exact_model(stack: Stack) -> None:
    if os.geteuid() == 0:
        os.chown(stack.out, 12345, 12346)  # the job must hand its files to the out folder's owner
    proc = stack.compose("up", "--exit-code-from", "job", timeout=600, check=False)
    assert proc.returncode == 0, f"up --exit-code-from job exited {proc.returncode}\n{proc.stdout[-8000:]}"
    np.testing.assert_array_equal(stack.model(), expected_model(3))
    assert [r["round"] for r in stack.history()] == [0, 1, 2]
    if os.geteuid() == 0:
        owners = {(p.stat().st_uid, p.stat().st_gid) for p in stack.out.rglob("*")}
        assert owners == {(12345, 12346)}, owners


def test_scaled_clients_get_distinct_stable_sites_and_all_train(stack: Stack) -> None:
    stack.env["SAGMQ_JOB"] = make_job(stack.jobs, "hello-4", min_clients=4, num_rounds=2,
                                      sites=[f"site-{n}" for n in range(1, 5)])
    stack.compose("up", "-d", "--scale", "client=4", *SERVICES, timeout=300)
    stack.wait_healthy()
    clients = stack.ids("client")
    assert len(clients) == 4
    # `docker compose ps` reports the healthchecks
    ps = stack.compose("ps").stdout
    assert ps.count("(healthy)") == 8, ps

    job = stack.compose("run", "--rm", "job", timeout=300, check=False)
    assert job.returncode == 0, job.stdout[-6000:] + job.stderr[-3000:]
    np.testing.assert_array_equal(stack.model(), expected_model(2))
    names = ["site-1", "site-2", "site-3", "site-4"]
    for record in stack.history():
        assert sorted(record["accepted"]) == names, record

    # restarted client containers keep their site names: the same four train the next job
    stack.compose("restart", "-t", "5", "client", timeout=120)
    stack.wait_healthy(["client"])
    job = stack.compose("run", "--rm", "job", timeout=300, check=False)
    assert job.returncode == 0, job.stdout[-6000:] + job.stderr[-3000:]
    for record in stack.history():
        assert sorted(record["accepted"]) == names, record
