"""Many sites in one process (`sagmq client --sites`): a real job, exact, with one client process."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sagmq.amqp import AmqpBus
from sagmq.cli.bench import write_job
from sagmq.job.spec import read_job_folder
from sagmq.wire.settings import Settings
from sagmq.wire.topology import site_topology
from tests.conftest import SAGMQ, System, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

SITES = 50
ROUNDS = 2
FLOATS = 20_000  # 80 kB: the sites of the process share one copy of each task and forwarded aggregate


def test_fifty_sites_in_one_process_run_a_job_exactly(system: System, settings: Settings, tmp_path: Path) -> None:
    sites = [f"sim-{i}" for i in range(1, SITES + 1)]
    base = np.arange(FLOATS, dtype=np.float32) * 0.5
    np.save(tmp_path / "initial.npy", base)
    job = write_job(tmp_path / "job", SITES, ROUNDS, tmp_path / "initial.npy")
    try:
        forward = {"SAGMQ_FORWARD_MIN_BYTES": "0"}  # round 1's model reaches the sites as the forwarded aggregate
        system.start_core(env=forward)
        # two workers for fifty sites: the pool, not a thread per site, runs their first-round deploys
        proc = system.stack.start("sims", "client", "--sites", f"sim-1..sim-{SITES}", "--workers", "2", env=forward)
        system.wait_sites(sites, timeout=60)
        assert [p.name for p in system.stack.procs if p.name not in ("persistor", "aggregator", "server")] == ["sims"]
        job_id = system.admin.submit(read_job_folder(job))
        st = system.wait_job(job_id, timeout=90)
        assert st["status"] == "finished", st
        rounds = [h for h in st["history"] if "done_at" in h]
        assert len(rounds) == ROUNDS
        assert all(sorted(h["accepted"]) == sorted(sites) for h in rounds), rounds
        final = np.load(settings.workspace / "persistor" / "jobs" / job_id / "models" / "server.npy")
        np.testing.assert_array_equal(final, base + ROUNDS)
        # every site kept its own executor and workspace
        for site in (sites[0], sites[-1]):
            assert (settings.workspace / site / "jobs" / job_id).is_dir()
        assert proc.popen.poll() is None, proc.tail()
    finally:
        system.close()
        bus = AmqpBus(settings, "cleanup", connect_timeout_s=5).connect()
        try:
            for site in sites:
                bus.channel.queue_delete(site_topology(settings.prefix, site).queues[0].name)
        finally:
            bus.close()


def test_a_shutdown_stops_the_whole_process(system: System, settings: Settings) -> None:
    sites = ["sim-a", "sim-b", "sim-c"]
    try:
        system.start_core()
        proc = system.stack.start("sims", "client", "--sites", ",".join(sites))
        system.wait_sites(sites)
        system.admin.call("shutdown", {"target": "client", "site": "sim-b"})
        wait_for(lambda: proc.popen.poll() is not None, 20, "the multi-site process to exit")
        assert proc.popen.returncode == 0, proc.tail()
    finally:
        system.close()
        bus = AmqpBus(settings, "cleanup", connect_timeout_s=5).connect()
        try:
            for site in sites:
                bus.channel.queue_delete(site_topology(settings.prefix, site).queues[0].name)
        finally:
            bus.close()


def test_bench_past_eight_sites_runs_them_in_a_few_processes(amqp_url: str, tmp_path: Path) -> None:
    # 12 sites: two `sagmq client --sites` processes of 6, and a floor of two processes
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SAGMQ_")}, "SAGMQ_AMQP_URL": amqp_url}
    p = subprocess.run([SAGMQ, "bench", "--clients", "12", "--floats", "50000", "--rounds", "2", "--json",
                        "--workspace", str(tmp_path / "ws"), "--keep"],
                       env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(p.stdout)
    assert report["correct"] is True and report["site_processes"] == 2
    assert len(report["floor_round_s"]) == 2 and report["ratio"] > 0
    logs = sorted(x.name for x in (tmp_path / "ws" / "logs").iterdir())
    assert logs == ["aggregator.log", "persistor.log", "server.log", "sites-1.log", "sites-2.log"]
    assert report["all_processes_mb"] >= sum(report["peak_rss_mb"][k] for k in ("server", "aggregator", "persistor"))
