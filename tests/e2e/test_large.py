"""A model far larger than the part size goes through every service in parts and comes out exact."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

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
