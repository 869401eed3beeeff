"""hello-numpy-cross-val end to end through `sagmq poc`: ScatterAndGather, then CrossSiteModelEval in the same
job, and NVFlare's cross_site_val/cross_val_results.json in the downloaded results."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import JOBS, SAGMQ

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

FINAL = np.array([[4, 5, 6], [7, 8, 9], [10, 11, 12]], dtype=np.float32)
SITES = ["site-1", "site-2"]


def test_poc_runs_hello_numpy_cross_val(amqp_url: str, tmp_path: Path) -> None:
    out = tmp_path / "DIR"
    env = {k: v for k, v in os.environ.items() if k != "SAGMQ_PREFIX"}
    env["SAGMQ_AMQP_URL"] = amqp_url
    p = subprocess.run([SAGMQ, "poc", str(JOBS / "hello-numpy-cross-val"), "--clients", "2", "--out", str(out),
                        "--workspace", str(tmp_path / "ws")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    np.testing.assert_array_equal(np.load(out / "models" / "server.npy"), FINAL)
    results = json.loads((out / "cross_site_val" / "cross_val_results.json").read_text())
    # every site x (every site's model + SRV_server), NVFlare's layout
    assert sorted(results) == SITES
    for data_client in SITES:
        assert sorted(results[data_client]) == ["SRV_server", *SITES]
        for owner, metrics in results[data_client].items():
            assert set(metrics) == {"accuracy"}, (data_client, owner)
            assert 6.0 <= metrics["accuracy"] < 7.0  # NVFlare's NPValidator: 72 / 12 + a random epsilon
    for site in SITES:  # the models the sites submitted, kept as NVFlare keeps them
        np.testing.assert_array_equal(np.load(out / "cross_site_val" / "model_shareables" / f"{site}.npy"), FINAL)
    server_log = (tmp_path / "ws" / "logs" / "server.log").read_text()
    assert "cross-site evaluation done: 6 result(s), 0 failure(s)" in server_log
