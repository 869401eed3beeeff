"""Filters end to end: what a site's task_result_filters leave in its result, read off the wire.

A spy queue of the test's own is bound to the results exchange with the results' routing key,
so the broker gives it a copy of every result the sites publish: what left each site.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pika
import pytest

from sagmq.job.spec import read_job_folder
from sagmq.wire.messages import TaskResult, decode
from sagmq.wire.topology import RK_RESULT, Names
from tests.conftest import System
from tests.e2e.jobmaker import make_job, np_trainer, server_config

pytestmark = [pytest.mark.e2e, pytest.mark.broker]
BASE = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.float32)
NVF = "nvflare.app_common.filters"


@contextmanager
def results_spy(system: System) -> Iterator[list[TaskResult]]:
    """Every result published while the block runs, decoded (the list fills when the block ends)."""
    conn = pika.BlockingConnection(pika.URLParameters(system.settings.amqp_url))
    try:
        ch = conn.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(q, Names(system.settings.prefix).results, RK_RESULT)
        got: list[TaskResult] = []
        yield got
        while True:
            method, _, body = ch.basic_get(q, auto_ack=True)
            if method is None:
                break
            got.append(decode(TaskResult, body, 2**26))
    finally:
        conn.close()


def run(system: System, job: Path, sites: list[str]) -> tuple[dict[str, Any], list[TaskResult], dict[str, bytes]]:
    system.start_all(sites)
    with results_spy(system) as seen:
        st = system.wait_job(system.admin.submit(read_job_folder(job)), 60)
    assert st["status"] == "finished", st
    return st, seen, system.admin.download(st["job_id"])


def with_result_filter(client: dict[str, Any], path: str, args: dict[str, Any]) -> dict[str, Any]:
    client["task_result_filters"] = [{"tasks": ["train"], "filters": [{"path": path, "args": args}]}]
    return client


def test_exclude_vars_result_filter_removes_the_variable_before_it_leaves_the_site(system: System,
                                                                                   tmp_path: Path) -> None:
    ckpt = tmp_path / "start.npz"
    np.savez(ckpt, w=BASE, secret=np.full(4, 7.0, np.float32))
    server = server_config({"min_clients": 2, "num_rounds": 2})  # WEIGHTS
    server["components"][0]["args"] = {"source_ckpt_file_full_name": str(ckpt)}
    client = with_result_filter(np_trainer(), f"{NVF}.exclude_vars.ExcludeVars", {"exclude_vars": ["secret"]})
    job = make_job(tmp_path, "exclude", server, {"site-1": client, "site-2": client}, min_clients=2)
    _, seen, files = run(system, job, ["site-1", "site-2"])
    assert sorted((r.site, r.round) for r in seen) == [("site-1", 0), ("site-1", 1), ("site-2", 0), ("site-2", 1)]
    for r in seen:  # what left each site: the trained w, and no secret
        assert r.rc == "OK" and r.dxo is not None and list(r.dxo.data) == ["w"], (r.site, r.round, r.dxo)
    assert "models/server.npy" not in files  # two variables: the model is an .npz, and says so
    with np.load(io.BytesIO(files["models/server.npz"]), allow_pickle=False) as z:
        np.testing.assert_array_equal(z["w"], BASE + 2)
        np.testing.assert_array_equal(z["secret"], np.full(4, 7.0, np.float32))  # kept its global value


def nvflare_percentile_privacy(data: dict[str, np.ndarray], steps: float, percentile: float,
                               gamma: float) -> dict[str, np.ndarray]:
    """NVFlare's PercentilePrivacy, step by step as NVFlare documents it."""
    delta_w = {name: data[name] / steps for name in data}
    all_abs = np.concatenate([np.abs(delta_w[name].ravel()) for name in delta_w])
    cutoff = np.percentile(a=all_abs, q=percentile, overwrite_input=False)
    for name in delta_w:
        diff_w = delta_w[name]
        if np.ndim(diff_w) == 0:
            delta_w[name] = diff_w * steps
            continue
        diff_w[(diff_w > -cutoff) & (diff_w < cutoff)] = 0.0
        delta_w[name] = np.clip(diff_w, a_min=-gamma, a_max=gamma) * steps
    return delta_w


def test_percentile_privacy_result_leaves_the_site_as_nvflares_filter_makes_it(system: System,
                                                                               tmp_path: Path) -> None:
    server = server_config({"min_clients": 1, "num_rounds": 1})
    client = with_result_filter(np_trainer(), f"{NVF}.percentile_privacy.PercentilePrivacy",
                                {"percentile": 50, "gamma": 5.0})
    job = make_job(tmp_path, "percentile", server, {"site-1": client})
    st, seen, files = run(system, job, ["site-1"])
    (r,) = seen
    unfiltered = {"numpy_key": BASE + 1}  # NPTrainer: the global model + 1, one local step
    expected = nvflare_percentile_privacy({k: v.copy() for k, v in unfiltered.items()}, 1, 50, 5.0)
    assert r.dxo is not None and list(r.dxo.data) == ["numpy_key"]
    assert r.dxo.data["numpy_key"].dtype == expected["numpy_key"].dtype
    np.testing.assert_array_equal(r.dxo.data["numpy_key"], expected["numpy_key"])
    assert not np.array_equal(r.dxo.data["numpy_key"], unfiltered["numpy_key"])
    np.testing.assert_array_equal(np.load(io.BytesIO(files["models/server.npy"])), expected["numpy_key"])
    assert json.loads(files["history.json"])[0]["aggregated"] == ["site-1"], st


def test_server_task_data_filter_runs_before_the_task_leaves_the_server(system: System, tmp_path: Path) -> None:
    ckpt = tmp_path / "start.npz"
    np.savez(ckpt, w=BASE, secret=np.full(4, 7.0, np.float32))
    server = server_config({"min_clients": 1, "num_rounds": 2})
    server["components"][0]["args"] = {"source_ckpt_file_full_name": str(ckpt)}
    server["task_data_filters"] = [{"tasks": ["train"], "filters": [
        {"path": f"{NVF}.ExcludeVars", "args": {"exclude_vars": "^sec"}}]}]
    job = make_job(tmp_path, "server-data", server, {"site-1": np_trainer()})
    _, seen, files = run(system, job, ["site-1"])
    # NPTrainer returns every variable it was given: the task came without the secret
    assert [sorted(r.dxo.data) for r in seen if r.dxo is not None] == [["w"], ["w"]]
    with np.load(io.BytesIO(files["models/server.npz"]), allow_pickle=False) as z:
        np.testing.assert_array_equal(z["w"], BASE + 2)
        np.testing.assert_array_equal(z["secret"], np.full(4, 7.0, np.float32))


def test_server_task_result_filter_runs_in_the_aggregator_after_the_wire(system: System, tmp_path: Path) -> None:
    server = server_config({"min_clients": 1, "num_rounds": 1})
    server["components"].append({"id": "dp", "path": f"{NVF}.percentile_privacy.PercentilePrivacy",
                                 "args": {"percentile": 50, "gamma": 5.0}})
    server["task_result_filters"] = [{"tasks": ["train"], "filters": ["dp"]}]  # by component id
    job = make_job(tmp_path, "server-result", server, {"site-1": np_trainer()})
    _, seen, files = run(system, job, ["site-1"])
    (r,) = seen
    assert r.dxo is not None
    np.testing.assert_array_equal(r.dxo.data["numpy_key"], BASE + 1)  # left the site unfiltered
    expected = nvflare_percentile_privacy({"numpy_key": BASE + 1}, 1, 50, 5.0)["numpy_key"]
    np.testing.assert_array_equal(np.load(io.BytesIO(files["models/server.npy"])), expected)
