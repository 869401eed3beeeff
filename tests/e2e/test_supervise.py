"""`sagmq supervise` with real services: a crashed child comes back, `shutdown all` stays down,
refused credentials stop at once with exit 3."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.conftest import JOBS, SAGMQ, System, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

FINAL = np.array([[4, 5, 6], [7, 8, 9], [10, 11, 12]], dtype=np.float32)


def health_pid(ws: Path, name: str) -> int | None:
    try:
        h = json.loads((ws / "health" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    return int(h["pid"]) if h["connected"] else None


def test_a_killed_child_is_restarted_and_shutdown_all_stays_down(system: System) -> None:
    ws = system.settings.workspace
    system.stack.start("persistor", "persistor")
    system.stack.start("aggregator", "aggregator")
    sups = [system.stack.start("sup-server", "supervise", "server")]
    sups += [system.stack.start(f"sup-{s}", "supervise", "client", "--site", s) for s in ("site-1", "site-2")]
    system.wait_sites(["site-1", "site-2"])
    old = wait_for(lambda: health_pid(ws, "client-site-1"), 20, "site-1's health file")
    os.kill(old, signal.SIGKILL)
    new = wait_for(lambda: (lambda p: p if p not in (None, old) else None)(health_pid(ws, "client-site-1")), 20,
                   "site-1 to come back under a new pid")
    assert new != old
    log = next(p for p in sups if p.name == "sup-site-1").tail(100)
    assert "client was killed by SIGKILL" in log and "restarting it in 1 s (restart 1)" in log
    env = {**os.environ, **system.env}
    sub = subprocess.run([SAGMQ, "submit", str(JOBS / "hello-numpy-sag")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    assert system.wait_job(job_id, 60)["status"] == "finished", system.logs()
    model = np.load(io.BytesIO(system.admin.download(job_id)["models/server.npy"]))
    np.testing.assert_array_equal(model, FINAL)
    down = subprocess.run([SAGMQ, "shutdown", "all"], env=env, capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    for p in sups:
        assert p.popen.wait(30) == 0, p.tail()
        assert "not restarting it" in p.tail(5)
    assert health_pid(ws, "client-site-1") is None  # a clean stop removes the health file


def test_refused_credentials_exit_3_at_once_without_restarts(system: System) -> None:
    bad = system.settings.amqp_url.replace("guest:guest@", "guest:wrong@")
    started = time.monotonic()
    p = system.stack.start("sup", "supervise", "client", "--site", "site-1", env={"SAGMQ_AMQP_URL": bad})
    assert p.popen.wait(30) == 3, p.tail()
    took = time.monotonic() - started
    log = p.tail(40)
    assert took < 10, log
    assert "the broker refused user guest: check SAGMQ_AMQP_URL" in log
    assert "exited with code 3" in log and "restarting it in" not in log


def test_sagmq_supervise_passes_sigterm_to_its_child(tmp_path: Path) -> None:
    env = {**os.environ, "SAGMQ_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/%2F",  # a child that keeps retrying
           "SAGMQ_WORKSPACE": str(tmp_path)}
    sup = subprocess.Popen([sys.executable, "-m", "sagmq.cli.main", "supervise", "client", "--site", "s1"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not psutil.Process(sup.pid).children():
            assert time.monotonic() < deadline, "no child started"
            time.sleep(0.05)
        (child,) = psutil.Process(sup.pid).children()
        time.sleep(0.5)
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(20) == 0
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
