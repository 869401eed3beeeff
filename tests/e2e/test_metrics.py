"""Every service's Prometheus metrics, scraped over HTTP from real processes during and after a job."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sagmq.job.spec import read_job_folder
from tests.conftest import System, wait_for
from tests.e2e.jobmaker import make_job, np_trainer, server_config

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

SITES = ("site-1", "site-2")
ROUNDS = 3
FLOATS = 200_000  # 800 kB: four parts of 256 kB a task or a result
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def scrape_when_up(port: int, timeout: float = 20) -> Samples:
    """The first scrape that answers (a service serves its metrics once it has connected and started)."""
    def attempt() -> Samples | None:
        try:
            return scrape(port)
        except OSError:  # (URLError is one) not listening yet
            return None
    return wait_for(attempt, timeout, f"metrics on port {port}", 0.1)


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of name whose labels include these."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def test_every_service_exports_its_metrics_during_and_after_a_job(system: System, tmp_path: Path) -> None:
    base = np.arange(FLOATS, dtype=np.float32)
    ckpt = tmp_path / "initial.npy"
    np.save(ckpt, base)
    model_bytes = base.nbytes
    server = server_config({"min_clients": 2, "num_rounds": ROUNDS})
    server["components"][0]["args"] = {"source_ckpt_file_full_name": str(ckpt)}
    job = make_job(tmp_path, "metrics", server, {s: np_trainer(delta=1, sleep_time=0.7) for s in SITES},
                   min_clients=2)
    system.env.update({"SAGMQ_CHUNK_BYTES": str(256 * 1024), "SAGMQ_FORWARD_MIN_BYTES": str(2**40)})
    ports = {name: free_port() for name in ("persistor", "aggregator", "server", *SITES)}
    for name in ("persistor", "aggregator", "server"):
        system.stack.start(name, name, env={"SAGMQ_METRICS_PORT": str(ports[name])})
    for site in SITES:
        system.start_client(site, env={"SAGMQ_METRICS_PORT": str(ports[site])})
    system.wait_sites(list(SITES))

    # before the job: who each endpoint is, and the server's view of the sites
    for name, port in ports.items():
        service, site = ("client", name) if name in SITES else (name, "")
        info = {dict(ls)["service"]: dict(ls) for (n, ls), _ in scrape_when_up(port).items()
                if n == "sagmq_service_info"}
        assert list(info) == [service] and info[service]["site"] == site, info
    srv = wait_for(lambda: (lambda s: s if get(s, "sagmq_sites_alive") == 2 else None)(scrape(ports["server"])),
                   10, "the server's metrics to count two live sites")
    assert get(srv, "sagmq_round") == -1 and get(srv, "sagmq_phase", phase="idle") == 1
    assert {dict(ls)["site"] for (n, ls), _ in srv.items() if n == "sagmq_site_last_seen_timestamp_seconds"} \
        == set(SITES)

    job_id = system.admin.submit(read_job_folder(job))
    # during the job: a round open, its task out to both sites (each takes 0.7 s to train)
    during = wait_for(lambda: (lambda s: s if get(s, "sagmq_phase", phase="training") == 1 else None)(
        scrape(ports["server"])), 30, "a round in training")
    assert 0 <= get(during, "sagmq_round") < ROUNDS
    assert get(during, "sagmq_rounds_started_total") >= 1
    assert get(during, "sagmq_sites_alive") == 2
    assert get(during, "sagmq_job_info", job_id=job_id) == 1

    st = system.wait_job(job_id, 60)
    assert st["status"] == "finished", st
    after = {name: scrape(port) for name, port in ports.items()}

    srv = after["server"]
    assert get(srv, "sagmq_rounds_started_total") == ROUNDS
    assert get(srv, "sagmq_rounds_finished_total") == ROUNDS
    assert get(srv, "sagmq_round_seconds_count") == ROUNDS
    assert 0.7 * ROUNDS <= get(srv, "sagmq_round_seconds_sum") < 60  # each round waits for a 0.7 s training
    assert get(srv, "sagmq_round_seconds_bucket", le="0.5") == 0
    assert get(srv, "sagmq_round_seconds_bucket", le="+Inf") == ROUNDS
    assert get(srv, "sagmq_contributions_total", result="accepted", reason="") == len(SITES) * ROUNDS
    assert total(srv, "sagmq_contributions_total", result="rejected") == 0
    assert get(srv, "sagmq_sites_alive") == len(SITES)
    assert get(srv, "sagmq_round") == -1 and get(srv, "sagmq_phase", phase="done") == 1
    # one task publish a round, fanned out to both sites by the broker
    assert ROUNDS * model_bytes <= get(srv, "sagmq_bytes_total", direction="sent", kind="task") < 2 * ROUNDS * model_bytes
    assert get(srv, "sagmq_messages_total", direction="received", kind="client.heartbeat") > 0
    assert get(srv, "sagmq_messages_total", direction="received", kind="admin.request") >= 1

    for site in SITES:
        s = after[site]
        assert get(s, "sagmq_bytes_total", direction="received", kind="task") >= ROUNDS * model_bytes
        assert get(s, "sagmq_bytes_total", direction="sent", kind="result") >= ROUNDS * model_bytes
        assert get(s, "sagmq_messages_total", direction="sent", kind="result") >= ROUNDS * 4  # in parts
        assert get(s, "sagmq_messages_total", direction="sent", kind="client.heartbeat") > 0

    agg = after["aggregator"]
    assert get(agg, "sagmq_bytes_total", direction="received", kind="result") >= len(SITES) * ROUNDS * model_bytes
    assert get(agg, "sagmq_bytes_total", direction="sent", kind="round.aggregated") >= ROUNDS * model_bytes
    assert get(agg, "sagmq_messages_total", direction="received", kind="round.open") >= ROUNDS

    per = after["persistor"]
    assert get(per, "sagmq_bytes_total", direction="sent", kind="model.loaded") >= model_bytes
    assert get(per, "sagmq_bytes_total", direction="received", kind="round.aggregated") >= model_bytes

    for name, s in after.items():
        assert total(s, "sagmq_dead_letters_total") == 0, name
        assert get(s, "sagmq_reconnects_total") == 0, name
        assert get(s, "process_resident_memory_bytes") > 0, name
        kinds = {dict(ls)["kind"] for (n, ls), _ in s.items() if n == "sagmq_messages_total"}
        assert "other" not in kinds, (name, kinds)


def test_a_taken_metrics_port_fails_the_service_at_once(tmp_path: Path) -> None:
    """Before any wait for the broker (here none answers): one line naming the setting, exit code 4."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "SAGMQ_METRICS_PORT": str(port), "SAGMQ_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/%2F",
               "SAGMQ_WORKSPACE": str(tmp_path / "ws")}
        started = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "sagmq.cli.main", "persistor"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert p.returncode == 4, p.stdout + p.stderr
    assert time.monotonic() - started < 5
    assert f"SAGMQ_METRICS_PORT={port}: cannot serve metrics" in p.stderr
    assert "Retrying" not in p.stdout + p.stderr and "connection refused" not in (p.stdout + p.stderr).lower()
