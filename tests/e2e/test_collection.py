"""NVFlare's collection mode end to end: a job whose aggregator expects a dict of kinds, sites whose custom
executor returns a COLLECTION DXO, over the real broker, to the exact model."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sagmq.job.spec import read_job_folder
from tests.conftest import System
from tests.e2e.jobmaker import make_job, server_config

pytestmark = [pytest.mark.e2e, pytest.mark.broker]
BASE = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.float32)

# A site's result: "model" a WEIGHT_DIFF of the model's numpy_key, "bias" the WEIGHTS of a variable of its own,
# "scores" METRICS. With same_variable, "bias" carries numpy_key too (the server must refuse to guess); pad_bytes
# adds that many bytes to "bias" (to make the result larger than the site's SAGMQ_CHUNK_BYTES).
EXECUTOR = """
import numpy as np
from sagmq.client.api import DXO, METRICS, NUM_STEPS_CURRENT_ROUND, WEIGHT_DIFF, WEIGHTS, Executor, collection


class CollectionTrainer(Executor):
    def __init__(self, delta=1.0, same_variable=False, pad_bytes=0, **_):
        self.delta = float(delta)
        self.same_variable = same_variable
        self.pad_bytes = pad_bytes

    def execute(self, task_name, dxo, ctx):
        model = dxo.data["numpy_key"]
        bias_name = "numpy_key" if self.same_variable else "bias"
        bias = np.full(model.shape if self.same_variable else (1,), self.delta * (ctx.round + 1), np.float32)
        head = {bias_name: bias}
        if self.pad_bytes:
            head["pad"] = np.zeros(self.pad_bytes // 4, np.float32)
        return collection({
            "model": DXO(WEIGHT_DIFF, {"numpy_key": np.full_like(model, self.delta)}, {NUM_STEPS_CURRENT_ROUND: 1}),
            "bias": DXO(WEIGHTS, head, {NUM_STEPS_CURRENT_ROUND: 1}),
            "scores": DXO(METRICS, {"accuracy": np.array(self.delta / 10)}, {}),
        }, {"site_note": "collection"})
"""

KINDS = {"model": "WEIGHT_DIFF", "bias": "WEIGHTS", "scores": "METRICS"}


def _job(tmp_path: Path, name: str, deltas: dict[str, float], per_site: dict[str, dict[str, Any]] | None = None,
         **executor_args: Any) -> Path:
    server = server_config({"min_clients": 2, "num_rounds": 2},
                           {"expected_data_kind": KINDS,
                            "aggregation_weights": {"model": {"site-1": 1.0, "site-2": 3.0}, "bias": {}, "scores": {}}})
    apps = {s: {"format_version": 2, "executors": [{"tasks": ["train"], "executor": {
        "path": "collection_trainer.CollectionTrainer",
        "args": {"delta": d, **executor_args, **(per_site or {}).get(s, {})}}}]}
        for s, d in deltas.items()}
    job = make_job(tmp_path, name, server, apps, min_clients=2)
    for site in deltas:
        custom = job / f"app_{site.replace('-', '_')}" / "custom"
        custom.mkdir()
        (custom / "collection_trainer.py").write_text(EXECUTOR)
    return job


def test_a_collection_job_finishes_with_the_exact_model(system: System, tmp_path: Path) -> None:
    deltas = {"site-1": 1.0, "site-2": 5.0}
    job = _job(tmp_path, "collection", deltas)
    st = system.wait_job(system.launch(job, list(deltas), "--allow-custom-code"), 60)
    assert st["status"] == "finished", st
    # per round: numpy_key += (1·1 + 3·5) / 4 = 4 (the "model" key's weights); bias = mean of the sites' WEIGHTS
    files = system.admin.download(st["job_id"])
    saved = np.load(io.BytesIO(files["models/server.npz"]))
    assert sorted(saved.files) == ["bias", "numpy_key"]
    np.testing.assert_array_equal(saved["numpy_key"], BASE + 8)
    assert saved["numpy_key"].dtype == np.float32
    np.testing.assert_array_equal(saved["bias"], np.array([(2.0 + 10.0) / 2], np.float32))
    # METRICS are recorded in each round's history, not applied to the model
    assert [h["round"] for h in st["history"]] == [0, 1]
    for h in st["history"]:
        assert sorted(h["aggregated"]) == ["site-1", "site-2"]
        assert h["collection_metrics"]["scores"]["accuracy"] == pytest.approx(0.3)
    saved_history = json.loads(files["history.json"])  # the persistor's history.json has them too
    assert [h["collection_metrics"]["scores"]["accuracy"] for h in saved_history] == pytest.approx([0.3, 0.3])


def test_a_variable_in_two_keys_fails_the_job_with_the_reason(system: System, tmp_path: Path) -> None:
    deltas = {"site-1": 1.0, "site-2": 5.0}
    job = _job(tmp_path, "collection-clash", deltas, same_variable=True)
    st = system.wait_job(system.launch(job, list(deltas), "--allow-custom-code"), 60)
    assert st["status"] == "failed", st
    assert "round 0" in st["reason"] and "'numpy_key' in both sub-DXO 'model' and 'bias'" in st["reason"], st


def test_a_collection_larger_than_the_chunk_size_is_refused_with_the_reason(system: System, tmp_path: Path) -> None:
    """site-2 sends its collection in parts (its SAGMQ_CHUNK_BYTES is 4 KiB, its result 8 KiB more): the
    aggregator refuses it, says why, and the round falls below min_clients."""
    deltas = {"site-1": 1.0, "site-2": 5.0}
    job = _job(tmp_path, "collection-large", deltas, per_site={"site-2": {"pad_bytes": 8192}})
    system.start_core()
    system.start_client("site-1", "--allow-custom-code")
    system.start_client("site-2", "--allow-custom-code", env={"SAGMQ_CHUNK_BYTES": "4096"})
    system.wait_sites(list(deltas))
    st = system.wait_job(system.admin.submit(read_job_folder(job)), 60)
    assert st["status"] == "failed", st
    (h,) = st["history"]
    (rej,) = h["rejected"]
    assert rej["site"] == "site-2" and "does not stream collections" in rej["reason"], h
    assert "SAGMQ_CHUNK_BYTES" in st["reason"] and "min_clients=2" in st["reason"], st
