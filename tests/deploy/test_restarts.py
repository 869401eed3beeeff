"""Crashes, `docker kill`, `sagmq shutdown all` and bad credentials against the Compose stack.

Measured on this engine (Docker 20.10, see deploy/README.md "Restarts"): `docker kill` is a manual
stop, which no restart policy undoes; a SIGKILL of a container's main process from the host is a
crash, which on-failure/unless-stopped/always restart; exit code 3 is restarted by every policy but
"no". The sagmq services therefore run under `sagmq supervise` with `restart: "no"`: supervise
restarts a crashed service process in place, and `docker start` (or `up -d`) brings back a killed
container.
"""

from __future__ import annotations

import time

import numpy as np

from tests.deploy.stack import SERVICES, Stack, crash, docker, expected_model, make_job, restarted, wait_until

ROUNDS = 10


def _start_slow_job(stack: Stack) -> str:
    """Start the stack with a job of ROUNDS rounds of about 1.5 s each; return the job container."""
    stack.env["SAGMQ_JOB"] = make_job(stack.jobs, "slow", num_rounds=ROUNDS, sleep_time=1.5)
    stack.compose("up", "-d", timeout=300)
    return stack.id("job")


def _docker_kill_stays_down(stack: Stack, container: str) -> None:
    """docker kill: the container stops (137) and Docker does not restart it; docker start brings it back."""
    docker("kill", container)
    assert stack.wait_exit(container, timeout=30) == 137
    time.sleep(3)
    state = stack.inspect(container, "{{.State.Status}} {{.RestartCount}}")
    assert state == "exited 0", f"after docker kill: {state}"
    docker("start", container)


def _finishes_exact(stack: Stack, job: str) -> None:
    code = stack.wait_exit(job, timeout=300)
    assert code == 0, stack.logs("job")[-6000:]
    np.testing.assert_array_equal(stack.model(), expected_model(ROUNDS))
    assert [r["round"] for r in stack.history()] == list(range(ROUNDS))


def test_client_crash_and_docker_kill_mid_job(stack: Stack) -> None:
    job = _start_slow_job(stack)
    server = stack.id("server")
    c1, c2 = stack.ids("client")
    stack.wait_round(server, 1)
    old = crash(c2, "client")  # the service process dies; supervise starts it again in the same container
    wait_until(lambda: restarted(c2, "client", old), 30, "supervise to restart the client")
    assert stack.inspect(c2, "{{.State.Status}}") == "running"
    stack.wait_round(server, 3)
    _docker_kill_stays_down(stack, c1)
    _finishes_exact(stack, job)
    assert "site-1" in stack.history()[-1]["accepted"] and "site-2" in stack.history()[-1]["accepted"]


def test_server_crash_and_docker_kill_mid_job(stack: Stack) -> None:
    job = _start_slow_job(stack)
    server = stack.id("server")
    stack.wait_round(server, 1)
    old = crash(server, "server")
    wait_until(lambda: restarted(server, "server", old), 30, "supervise to restart the server")
    stack.wait_round(server, 3)
    _docker_kill_stays_down(stack, server)
    _finishes_exact(stack, job)


def test_shutdown_all_stays_down_and_bad_credentials_exit_3(stack: Stack) -> None:
    stack.compose("up", "-d", *SERVICES, timeout=300)
    stack.wait_healthy()
    # bad credentials: exit code 3 with a clear line, once (supervise does not retry, Docker does not restart)
    bad = stack.compose("run", "--rm", "-e", "SAGMQ_AMQP_URL=amqp://sagmq:wrong@rabbitmq:5672/%2F",
                        "-e", "SAGMQ_SITE=site-x", "client", timeout=180, check=False)
    assert bad.returncode == 3, bad.stdout[-3000:] + bad.stderr[-3000:]
    assert "credential" in (bad.stdout + bad.stderr).lower() or "auth" in (bad.stdout + bad.stderr).lower(), \
        bad.stdout[-3000:] + bad.stderr[-3000:]

    containers = [c for s in SERVICES for c in stack.ids(s)]
    stack.compose("run", "--rm", "admin", "sagmq", "shutdown", "all", timeout=120)
    for c in containers:
        assert stack.wait_exit(c, timeout=60) == 0, f"{c[:12]} did not exit 0 after shutdown all"
    time.sleep(5)
    for c in containers:
        state = stack.inspect(c, "{{.State.Status}} {{.State.ExitCode}} {{.RestartCount}}")
        assert state == "exited 0 0", f"{c[:12]} after shutdown all: {state}"
    assert stack.health(stack.id("rabbitmq")) == "healthy"  # only the sagmq services stop
