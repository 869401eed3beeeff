"""Run Compose projects of docker-compose.yml (and deploy/ overlays) against the real Docker engine.

Every test gets its own project name, its own out/jobs folders and ephemeral loopback ports, and
tears its project down with `down -v`. The images come from deploy/local-images.sh, built once per
session (see conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
CLUSTER_FILE = ROOT / "deploy" / "cluster.yml"
MULTIHOST = ROOT / "deploy" / "multihost"
HELLO = ROOT / "jobs" / "hello-numpy-sag"
INITIAL = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.float32)
SERVICES = ("server", "aggregator", "persistor", "client")


def compose_command() -> list[str]:
    """docker-compose 1.29 when installed (what CI has), else the v2 plugin."""
    exe = shutil.which("docker-compose")
    return [exe] if exe else ["docker", "compose"]


def run(cmd: Sequence[str], timeout: float = 300, check: bool = True,
        env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure (check) raise with its output, which is what a failing test needs."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["docker", *args], timeout=timeout, check=check)


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll pred until it returns something truthy; fail with `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def expected_model(num_rounds: int) -> np.ndarray:
    """Every site adds 1 per round and the weighted average of equal models is that model."""
    return INITIAL + num_rounds


def make_job(jobs_dir: Path, name: str, *, min_clients: int = 2, num_rounds: int = 3, sleep_time: float = 0.0,
             sites: Sequence[str] = ("site-1", "site-2")) -> str:
    """A copy of hello-numpy-sag with other min_clients, rounds, training time and weighted sites; returns
    its path as the job service sees it (jobs/NAME)."""
    dest = jobs_dir / name
    shutil.copytree(HELLO, dest)
    meta = json.loads((dest / "meta.json").read_text())
    meta.update(name=name, min_clients=min_clients)
    (dest / "meta.json").write_text(json.dumps(meta, indent=2))
    server_path = dest / "app" / "config" / "config_fed_server.json"
    server = json.loads(server_path.read_text())
    server["workflows"][0]["args"].update(min_clients=min_clients, num_rounds=num_rounds,
                                          wait_time_after_min_received=0)
    for comp in server["components"]:
        if comp["id"] == "aggregator":
            comp["args"]["aggregation_weights"] = {s: 1.0 for s in sites}
    server_path.write_text(json.dumps(server, indent=2))
    client_path = dest / "app" / "config" / "config_fed_client.json"
    client = json.loads(client_path.read_text())
    client["executors"][0]["executor"]["args"] = {"sleep_time": sleep_time}
    client_path.write_text(json.dumps(client, indent=2))
    return f"jobs/{name}"


class Stack:
    """One Compose project: `compose(...)` runs docker-compose with this project's name, files and variables."""

    def __init__(self, env_file: Path, work: Path, files: Sequence[Path] = (COMPOSE_FILE,),
                 name: str = "", extra_env: dict[str, str] | None = None) -> None:
        self.project = f"sagmqt{name}{uuid.uuid4().hex[:6]}"
        self.files = list(files)
        self.work = work
        self.out = work / "out"
        self.jobs = work / "jobs"
        self.out.mkdir(parents=True, exist_ok=True)
        self.jobs.mkdir(parents=True, exist_ok=True)
        shutil.copytree(HELLO, self.jobs / HELLO.name)
        # A clean environment: the test process's own SAGMQ_* settings must not leak into the stack.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGMQ_", "COMPOSE_"))}
        self.env.update({
            "SAGMQ_OUT_DIR": str(self.out), "SAGMQ_JOBS_DIR": str(self.jobs),
            # empty: Docker picks free loopback ports, so projects never collide with each other or the host
            "SAGMQ_AMQP_PORT": "", "SAGMQ_MANAGEMENT_PORT": "", "SAGMQ_RABBITMQ_METRICS_PORT": "",
            "SAGMQ_PROMETHEUS_PORT": "", "SAGMQ_GRAFANA_PORT": "",
        })
        self.env.update(extra_env or {})
        self.env_file = env_file

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*compose_command(), "--env-file", str(self.env_file), "-p", self.project]
        for f in self.files:
            cmd += ["-f", str(f)]
        return run([*cmd, *args], timeout=timeout, check=check, env=self.env)

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "-t", "5", timeout=180, check=False)

    def ids(self, service: str) -> list[str]:
        """Container ids of a service (running or not), in replica order."""
        out = self.compose("ps", "-a", "-q", service).stdout.split()
        return sorted(out, key=lambda c: int(self.inspect(c, "{{index .Config.Labels \"com.docker.compose.container-number\"}}")))

    def id(self, service: str, index: int = 1) -> str:
        return self.ids(service)[index - 1]

    @staticmethod
    def inspect(container: str, fmt: str) -> str:
        return docker("inspect", "-f", fmt, container).stdout.strip()

    def health(self, container: str) -> str:
        return self.inspect(container, "{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}")

    def wait_healthy(self, services: Sequence[str] = SERVICES, timeout: float = 120) -> None:
        def all_healthy() -> bool:
            ids = [c for s in services for c in self.ids(s)]
            return bool(ids) and all(self.health(c) == "healthy" for c in ids)
        wait_until(all_healthy, timeout, f"{', '.join(services)} healthy in {self.project}", interval=1)

    def exec_sagmq(self, container: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return docker("exec", container, "sagmq", *args, timeout=timeout, check=False)

    def job_status(self, container: str, job_id: str) -> dict[str, Any] | None:
        """`sagmq status JOB --json` run in a container; None while it fails (e.g. the server restarts)."""
        proc = self.exec_sagmq(container, "status", job_id, "--json")
        if proc.returncode != 0:
            return None
        try:
            return dict(json.loads(proc.stdout))
        except json.JSONDecodeError:
            return None

    def running_job(self, container: str) -> dict[str, Any] | None:
        """The job the server runs now (from `sagmq list`), with its current round, or None; fails when a
        job has already ended (the test came too late to act in the middle of it)."""
        proc = self.exec_sagmq(container, "list")
        for line in proc.stdout.splitlines()[1:] if proc.returncode == 0 else []:
            fields = line.split()
            if len(fields) >= 4 and fields[2] in ("finished", "failed", "aborted"):
                raise AssertionError(f"job {fields[0]} already {fields[2]}: too late to act mid-job")
            if len(fields) >= 4 and fields[2] == "running":
                return self.job_status(container, fields[0])
        return None

    def wait_round(self, server: str, at_least: int, timeout: float = 120) -> dict[str, Any]:
        """Wait until the running job's current round is at least `at_least`."""
        def reached() -> dict[str, Any] | None:
            job = self.running_job(server)
            if job and (job.get("current_round") or 0) >= at_least:
                return job
            return None
        return dict(wait_until(reached, timeout, f"a running job at round >= {at_least}", interval=1))

    def wait_exit(self, container: str, timeout: float = 300) -> int:
        """`docker wait`: the container's exit code once it has stopped."""
        return int(docker("wait", container, timeout=timeout).stdout.strip())

    def model(self) -> np.ndarray:
        return np.asarray(np.load(self.out / "models" / "server.npy"))

    def history(self) -> list[dict[str, Any]]:
        return list(json.loads((self.out / "history.json").read_text()))

    def logs(self, *services: str) -> str:
        return self.compose("logs", "--no-color", *services, timeout=60, check=False).stdout


def service_process(container: str, service: str) -> psutil.Process:
    """The `sagmq SERVICE` process that `sagmq supervise SERVICE` runs inside a container, seen from the host."""
    pid = int(Stack.inspect(container, "{{.State.Pid}}"))
    for proc in psutil.Process(pid).children(recursive=True):
        cmd = proc.cmdline()
        if service in cmd and "supervise" not in cmd:
            return proc
    raise AssertionError(f"no `sagmq {service}` process under container {container[:12]} (pid {pid})")


def restarted(container: str, service: str, old_pid: int) -> bool:
    """Whether a service process other than old_pid runs in the container (supervise restarted it)."""
    try:
        return service_process(container, service).pid != old_pid
    except (AssertionError, psutil.NoSuchProcess):
        return False  # between two children (supervise's backoff), or the process just went


def crash(container: str, service: str) -> int:
    """SIGKILL the service process (not the container's main process): a crash that supervise handles."""
    proc = service_process(container, service)
    os.kill(proc.pid, signal.SIGKILL)
    return proc.pid
