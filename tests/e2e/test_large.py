"""A model far larger than the part size goes through every service in parts and comes out exact;
from the second round on it reaches the sites with the aggregate (forwarded), not with the task."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from sagmq.amqp import AmqpBus
from sagmq.job.spec import read_job_folder
from sagmq.wire.topology import Names, rk_aggregate
from tests.conftest import System
from tests.e2e.jobmaker import make_job, np_trainer, server_config

pytestmark = [pytest.mark.e2e, pytest.mark.broker]


def test_chunked_model_through_all_services(system: System, tmp_path: Path) -> None:
    base = (np.arange(300_000) % 997).astype(np.float32)  # 1.2 MB in parts of 64 KiB
    ckpt = tmp_path / "initial.npy"
    np.save(ckpt, base)
    server = server_config({"min_clients": 3, "num_rounds": 2},
                           {"expected_data_kind": "WEIGHTS", "aggregation_weights": {"site-3": 2.0}})
    server["components"][0]["args"] = {"source_ckpt_file_full_name": str(ckpt)}
    apps = {"site-1": np_trainer(delta=1), "site-2": np_trainer(delta=2), "site-3": np_trainer(delta=4)}
    job = make_job(tmp_path, "large", server, apps, min_clients=3)
    system.env["SAGMQ_CHUNK_BYTES"] = str(64 * 1024)
    st = system.wait_job(system.launch(job, list(apps)), 90)
    assert st["status"] == "finished", st
    files = system.admin.download(st["job_id"])
    final = np.load(io.BytesIO(files["models/server.npy"]))
    step = np.float32((1 + 2 + 2 * 4) / 4)  # weights 1, 1, 2
    np.testing.assert_allclose(final, base + 2 * step, rtol=1e-6)
    assert final.dtype == np.float32 and final.shape == base.shape
    logs = system.logs()
    assert "dead-lettering" not in logs, logs
    persistor = next(p for p in system.stack.procs if p.name == "persistor").log.read_text()
    # WEIGHTS over every variable: the persistor saved the aggregates it was routed, not a second copy
    assert persistor.count("(model.commit of its aggregate)") == 2, persistor
    # round 0's aggregate went to the three sites with the same publish, and round 1's task only named it
    server = next(p for p in system.stack.procs if p.name == "server").log.read_text()
    assert server.count("(model forwarded with the aggregate to site-1, site-2, site-3)") == 1, server
    for site in apps:
        log = next(p for p in system.stack.procs if p.name == site).log.read_text()
        assert "aggregate of round 0 of job" in log and "held as the next model" in log, log


def model_job(tmp_path: Path, rounds: int) -> tuple[Path, np.ndarray]:
    base = (np.arange(300_000) % 997).astype(np.float32)
    ckpt = tmp_path / "initial.npy"
    np.save(ckpt, base)
    server = server_config({"min_clients": 2, "num_rounds": rounds}, {"expected_data_kind": "WEIGHTS"})
    server["components"][0]["args"] = {"source_ckpt_file_full_name": str(ckpt)}
    apps = {"site-1": np_trainer(delta=1), "site-2": np_trainer(delta=3)}
    return make_job(tmp_path, "fwd", server, apps, min_clients=2), base


def test_a_site_without_the_forwarded_model_gets_the_whole_task(system: System, tmp_path: Path) -> None:
    """site-2's queue loses its aggregate binding: the aggregate never reaches it, its tasks name a model
    it lacks, it says so in its heartbeat, and the server sends it the whole task each round."""
    job, base = model_job(tmp_path, 3)
    system.env["SAGMQ_CHUNK_BYTES"] = str(256 * 1024)
    system.start_all(["site-1", "site-2"])
    bus = AmqpBus(system.settings, "test", connect_timeout_s=5).connect()
    try:
        n = Names(system.settings.prefix)
        bus.channel.queue_unbind(n.site_queue("site-2"), n.events, rk_aggregate("site-2"))
    finally:
        bus.close()
    st = system.wait_job(system.admin.submit(read_job_folder(job)), 90)
    assert st["status"] == "finished", st
    final = np.load(io.BytesIO(system.admin.download(st["job_id"])["models/server.npy"]))
    np.testing.assert_array_equal(final, base + 3 * np.float32(2))  # mean of +1 and +3, three rounds
    server = next(p for p in system.stack.procs if p.name == "server").log.read_text()
    # rounds 1 and 2 (again only if the whole task took more than 2 s to arrive; the site runs it once)
    assert server.count("site site-2 lacks the forwarded model") >= 2, server
    site2 = next(p for p in system.stack.procs if p.name == "site-2").log.read_text()
    assert site2.count("asking the server for the whole task") == 2, site2
    assert "held as the next model" not in site2
    site1 = next(p for p in system.stack.procs if p.name == "site-1").log.read_text()
    assert site1.count("held as the next model") == 2, site1
    assert "dead-lettering" not in system.logs()
