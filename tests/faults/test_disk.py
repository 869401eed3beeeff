"""A persistor whose disk fails mid-job (issue 11, failure 3), with real processes.

The tests run as root, so a chmod would not stop the persistor's writes: the job's models folder is
replaced by a regular file instead (every save under it then fails with an OSError, as on a disk
that refuses writes), and put back to repair the disk.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sagmq.job.spec import read_job_folder
from tests.conftest import System, wait_for
from tests.e2e.jobmaker import make_job, np_trainer, server_config

pytestmark = [pytest.mark.e2e, pytest.mark.broker]
BASE = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.float32)
ROUNDS = 10


class BrokenDisk:
    """The job's models folder swapped for a file (break) and back (repair)."""

    def __init__(self, models: Path) -> None:
        self.models = models
        self.kept = models.with_name("models.kept")

    def break_(self) -> None:
        self.models.rename(self.kept)
        if self.models.is_dir():  # a save made the folder again in between: keep what it wrote
            for f in self.models.iterdir():
                os.replace(f, self.kept / f.name)
            self.models.rmdir()
        self.models.write_bytes(b"not a folder")

    def repair(self) -> None:
        if self.kept.exists():
            self.models.unlink(missing_ok=True)
            self.kept.rename(self.models)


def start(system: System, tmp_path: Path, name: str, limit_s: float) -> tuple[str, BrokenDisk]:
    """hello-numpy-sag with 2 sites and ROUNDS short rounds, the persistor's retry limit set to limit_s;
    the job's id and its models folder, once round 3 is running."""
    system.start_core(env={"SAGMQ_PERSIST_RETRY_LIMIT_S": str(limit_s)})
    for s in ("site-1", "site-2"):
        system.start_client(s)
    system.wait_sites(["site-1", "site-2"])
    server = server_config({"min_clients": 2, "num_rounds": ROUNDS})
    apps = {s: np_trainer(sleep_time=0.3) for s in ("site-1", "site-2")}
    job_id = system.admin.submit(read_job_folder(make_job(tmp_path, name, server, apps, min_clients=2)))
    wait_for(lambda: (system.admin.status(job_id).get("current_round") or 0) >= 3, 30, "round 3")
    models = system.settings.workspace / "persistor" / "jobs" / job_id / "models"
    wait_for(models.is_dir, 10, "the job's models folder")
    return job_id, BrokenDisk(models)


def retrying_s(st: dict[str, Any]) -> int:
    """How long the status says the persistor has been retrying (-1: it says nothing of it)."""
    m = re.search(r"retrying since (\d+) s", st.get("waiting_for", ""))
    return int(m.group(1)) if m else -1


def persistor_log(system: System) -> str:
    return "\n".join(p.log.read_text(errors="replace") for p in system.stack.procs if p.name == "persistor")


def test_a_disk_repaired_within_the_limit_lets_the_job_finish_exactly(system: System, tmp_path: Path) -> None:
    job_id, disk = start(system, tmp_path, "diskrepaired", limit_s=120)
    try:
        disk.break_()
        st = wait_for(lambda: (lambda s: s if s.get("phase") == "saving" and retrying_s(s) >= 3 else None)(
            system.admin.status(job_id)), 60, "the final save to wait on the refused ones for 3 s")
        assert st["status"] == "running" and st["waiting_for"].startswith("persistor: [Errno"), st
        disk.repair()
        st = system.wait_job(job_id, 40)  # the backoff is capped at 10 s
    finally:
        disk.repair()
    assert st["status"] == "finished", st
    assert [h["round"] for h in st["history"]] == list(range(ROUNDS)), st["history"]
    files = system.admin.download(job_id)
    np.testing.assert_array_equal(np.load(io.BytesIO(files["models/server.npy"])), BASE + ROUNDS)
    np.testing.assert_array_equal(np.load(io.BytesIO(files[f"models/round-{ROUNDS - 1}.npy"])), BASE + ROUNDS)
    history = json.loads(files["history.json"])
    assert [h["round"] for h in history] == list(range(ROUNDS)), history
    log = persistor_log(system)
    assert 1 <= log.count("cannot save round") <= 2, log  # once per distinct error (and at most one repeat line)
    assert "dead-lettering" not in log, log


def test_a_disk_never_repaired_fails_the_job_with_the_error_within_the_limit(system: System, tmp_path: Path) -> None:
    limit = 6.0
    job_id, disk = start(system, tmp_path, "disknotrepaired", limit_s=limit)
    try:
        disk.break_()
        broke = time.monotonic()
        st = system.wait_job(job_id, limit + 30)
        took = time.monotonic() - broke
    finally:
        disk.repair()
    assert st["status"] == "failed", st
    assert "persistor" in st["reason"] and "[Errno" in st["reason"] and "gave up" in st["reason"], st["reason"]
    assert took <= limit + 8, took  # a save comes within a round of the break; the last try falls on the limit
    shutil.rmtree(disk.kept, ignore_errors=True)
