"""`sagmq wait` tells a large model's transfer (bytes the sites received, results gathered), and the
metrics the sites' executors put in their results' DXO meta reach the round history and `sagmq plot`.

One job: a 20 MB model, 3 sites whose executor (the job's custom code) trains for 1 s and reports
{"loss": ...} in meta["metrics"], 2 rounds.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sagmq.cli.plot import read_series
from sagmq.job.spec import read_job_folder
from tests.conftest import SAGMQ, System, wait_for
from tests.e2e.jobmaker import make_job, server_config

pytestmark = [pytest.mark.e2e, pytest.mark.broker, pytest.mark.timeout(180)]

SITES = ["site-1", "site-2", "site-3"]
ROUNDS = 2
MODEL = 5 * 2**20  # float32 values: 20 MiB

LOSS_TRAINER = '''
"""Adds 1 to every weight after 1 s, and reports a loss that falls with the round and differs by site."""
from sagmq.client.api import DXO, NUM_STEPS_CURRENT_ROUND, WEIGHTS, Executor


class LossTrainer(Executor):
    def execute(self, task_name, dxo, ctx):
        ctx.abort.wait(1.0)
        out = {k: v + v.dtype.type(1) for k, v in dxo.data.items()}
        loss = 1.0 / (ctx.round + 1) + int(ctx.site.rsplit("-", 1)[1]) / 100
        return DXO(WEIGHTS, out, {NUM_STEPS_CURRENT_ROUND: 1, "metrics": {"loss": loss}})
'''


def loss_job(root: Path) -> Path:
    ckpt = root / "initial.npy"
    root.mkdir(parents=True, exist_ok=True)
    np.save(ckpt, np.zeros(MODEL, dtype=np.float32))
    server = server_config({"min_clients": 3, "num_rounds": ROUNDS})
    server["components"][0]["args"] = {"source_ckpt_file_full_name": str(ckpt)}
    client = {"format_version": 2,
              "executors": [{"tasks": ["train"], "executor": {"path": "loss_trainer.LossTrainer", "args": {}}}]}
    job = make_job(root, "loss-sag", server, dict.fromkeys(SITES, client), min_clients=3)
    for site in SITES:
        custom = job / f"app_{site.replace('-', '_')}" / "custom"
        custom.mkdir(parents=True)
        (custom / "loss_trainer.py").write_text(LOSS_TRAINER)
    return job


def test_wait_shows_transfer_progress_and_plot_draws_reported_metrics(system: System, tmp_path: Path) -> None:
    # the job waits for site-3 while both waiters start: they are polling when round 0's task leaves
    system.start_all(SITES[:2], "--allow-custom-code")
    job_id = system.admin.submit(read_job_folder(loss_job(tmp_path / "jobs")))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SAGMQ_")}, **system.env}
    as_json = subprocess.Popen([SAGMQ, "wait", job_id, "--json"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    human = subprocess.Popen([SAGMQ, "wait", job_id], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        assert as_json.stdout is not None and human.stdout is not None
        for p in (as_json, human):  # each has told the job waits for sites: it polls
            wait_for(lambda p=p: "sites: 2 of 3" in p.stdout.readline(), 30, "wait to poll the queued job", 0)
        system.start_client(SITES[2], "--allow-custom-code")
        out, err = as_json.communicate(timeout=120)
        hout, herr = human.communicate(timeout=30)
    finally:
        for p in (as_json, human):
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert as_json.returncode == 0 and human.returncode == 0, (err, herr)
    events = [json.loads(x) for x in out.splitlines()]
    size = MODEL * 4
    for r in range(ROUNDS):
        progress = [e for e in events if e["event"] == "progress" and e["round"] == r]
        assert progress, (r, events)
        got = [e["received_bytes"] for e in progress]
        assert got == sorted(got) and got[-1] == 3 * size, (r, progress)  # every site got the whole task
        assert all(e["task_bytes"] == size and e["total_bytes"] == 3 * size and e["targets"] == 3 for e in progress)
        assert [e["results"] for e in progress] == sorted(e["results"] for e in progress)
    assert any(e["received_bytes"] < 3 * size for e in events if e["event"] == "progress"), events  # it grew
    lines = [x for x in hout.splitlines() if " MB at 3 sites" in x]
    assert lines and all(x.startswith("round ") and ", results " in x and " of 3" in x for x in lines), hout
    assert any(x.startswith("round 1: task 60.0/60.0 MB at 3 sites (3 received)") for x in lines), hout
    assert any(x.startswith("round 1: 3 accepted") and x.endswith("; loss 0.52") for x in hout.splitlines()), hout

    st = system.admin.status(job_id)
    assert st["status"] == "finished", st
    for h in st["history"]:
        expect = {s: {"loss": 1.0 / (h["round"] + 1) + int(s[-1]) / 100} for s in SITES}
        assert h["metrics"] == expect, h
    png = tmp_path / "plot.png"
    subprocess.run([SAGMQ, "plot", job_id, "--out", str(png)], env=env, check=True, capture_output=True,
                   timeout=60)
    drawn = read_series(png)
    assert drawn["rounds"] == [0, 1]
    assert drawn["metrics"]["loss"] == pytest.approx([1.0 + 0.02, 0.5 + 0.02])  # mean over the 3 sites


def test_poc_follows_a_large_models_transfer(amqp_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGMQ_")}
    env.update({"SAGMQ_AMQP_URL": amqp_url, "SAGMQ_HEARTBEAT_S": "0.3"})
    p = subprocess.run([SAGMQ, "poc", str(loss_job(tmp_path / "jobs")), "--clients", "3", "--allow-custom-code",
                        "--out", str(tmp_path / "out"), "--workspace", str(tmp_path / "ws")],
                       env=env, capture_output=True, text=True, timeout=150, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    told = [x for x in p.stdout.splitlines() if " MB at 3 sites (" in x]
    assert any(x.startswith("round 0: task ") for x in told) and any(x.startswith("round 1: task ") for x in told), \
        p.stdout
    assert any(x.endswith("MB at 3 sites (3 received), results 0 of 3") for x in told), p.stdout  # (training 1 s)
    assert read_series(tmp_path / "out" / "plot.png")["metrics"]["loss"] == pytest.approx([1.02, 0.52])
