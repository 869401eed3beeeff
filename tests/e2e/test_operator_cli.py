"""The operator's commands against a real job: status (human and JSON), wait --json, watch in tmux and
as lines, list/dead list --json, plot, download's plot.png, teardown.

The job runs 3 rounds whose sites train for 1 s and 4 s, so each round stays open long enough to be seen.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from sagmq.cli.plot import read_series
from sagmq.wire.topology import service_topology
from tests.conftest import SAGMQ, System, wait_for
from tests.e2e.jobmaker import make_job, np_trainer, server_config
from tests.integration.test_cli_errors import closed_port

pytestmark = [pytest.mark.e2e, pytest.mark.broker, pytest.mark.timeout(240)]

ROUNDS = 3
SITES = ["site-1", "site-2"]


@pytest.fixture(scope="module")
def management() -> str:
    """The broker's management API, enabled if it is not (a plugin the broker loads while it runs)."""
    url = "http://127.0.0.1:15672/api/overview"

    def up() -> bool:
        req = urllib.request.Request(url, headers={"Authorization": "Basic Z3Vlc3Q6Z3Vlc3Q="})  # guest:guest
        try:
            with urllib.request.urlopen(req, timeout=2):
                return True
        except OSError:
            return False

    if not up():
        subprocess.run(["rabbitmq-plugins", "enable", "rabbitmq_management"], check=True, capture_output=True,
                       timeout=120)
        wait_for(up, 60, "the management API to answer")
    return url


def slow_job(root: Path) -> Path:
    return make_job(root, "slow-sag", server_config({"num_rounds": ROUNDS}),
                    {"site-1": np_trainer(sleep_time=1.0), "site-2": np_trainer(sleep_time=4.0)}, min_clients=2)


def cli(system: System, *args: str, env: dict[str, str] | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SAGMQ_")}
    return subprocess.run([SAGMQ, *args], env={**base, **system.env, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, check=False)


def ok(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 0, f"{p.args} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p.stdout


def mid_round(system: System, job_id: str) -> dict[str, Any]:
    """Wait until a round is open with one site answered and one pending."""
    def open_half() -> dict[str, Any] | None:
        st = system.admin.status(job_id)
        rec = st.get("open_round") or {}
        return st if st.get("phase") == "training" and len(rec.get("accepted", [])) == 1 else None
    return dict(wait_for(open_half, 30, "a round with one site accepted", 0.05))


def check_status_during_the_job(system: System, job_id: str) -> None:
    mid_round(system, job_id)
    snap = wait_for(lambda: (lambda s: s if (s["running"] or {}).get("phase") == "training" else None)(
        json.loads(ok(cli(system, "status", "--json")))), 20, "status --json during a round")
    assert {s["site"] for s in snap["sites"] if s["alive"]} == set(SITES)
    job = snap["running"]
    assert job["job_id"] == job_id and job["phase"] == "training" and 0 <= job["current_round"] < ROUNDS
    assert (job["first_round"], job["last_round"]) == (0, ROUNDS - 1)
    assert sorted(job["open_round"]["targets"]) == SITES
    assert snap["queues_from"].startswith("management API http://localhost:15672"), snap["queues_from"]
    queues = {q["name"]: q for q in snap["queues"]}
    p = system.settings.prefix
    assert {f"{p}.results", f"{p}.server", f"{p}.dead", f"{p}.site.site-1", f"{p}.site.site-2"} <= set(queues)
    assert queues[f"{p}.results"]["consumers"] == 1 and queues[f"{p}.site.site-1"]["consumers"] == 1
    assert all(isinstance(q["messages"], int) and q["messages"] >= 0 for q in queues.values())
    assert all(isinstance(q["publish_rate"], float) for q in queues.values())  # rates come with the API
    assert snap["dead_letters"] == 0

    mid_round(system, job_id)
    text = wait_for(lambda: (lambda s: s if "accepted 1 of 2 expected" in s else None)(ok(cli(system, "status"))),
                    20, "status while a round has one of two results")
    assert "SITES  2 of 2 alive" in text
    assert f"RUNNING JOB  {job_id[:8]} (slow-sag) running: round " in text and f"(0..{ROUNDS - 1}), phase training" \
        in text
    assert "waits for: sites: results of round" in text and "from site-2" in text
    for q in (f"{p}.results", f"{p}.site.site-1", f"{p}.site.site-2"):
        assert f"\n  {q} " in text
    assert f"dead letters: 0 in {p}.dead" in text

    # no management API: depth and consumers from passive declares
    fallback = json.loads(ok(cli(system, "status", "--json",
                                 env={"SAGMQ_MANAGEMENT_URL": f"http://127.0.0.1:{closed_port()}"})))
    assert fallback["queues_from"].startswith("passive declares (management API")
    q = {x["name"]: x for x in fallback["queues"]}
    assert q[f"{p}.results"]["consumers"] == 1 and q[f"{p}.results"]["publish_rate"] is None


def tmux_screen(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True,
                          check=True).stdout


def start_watch_in_tmux(system: System, job_id: str, session: str, tmp: Path) -> None:
    env = " ".join(f"{k}={v}" for k, v in system.env.items())
    script = tmp / "watch.sh"
    # the pane's own size, not one the test runner's environment may carry
    script.write_text(f"unset COLUMNS LINES; cd {tmp} && env {env} {SAGMQ} watch --job {job_id}; "
                      "echo WATCH-EXIT=$?; sleep 120\n")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "50", "bash", str(script)],
                   check=True)


def test_status_wait_watch_plot_download_teardown_of_a_real_job(system: System, tmp_path: Path,
                                                                 management: str) -> None:
    assert shutil.which("tmux"), "tmux is needed for the watch test (apt-get install tmux)"
    session = f"sagmq-watch-{uuid.uuid4().hex[:6]}"
    system.start_all(SITES)
    job_id = system.admin.submit(_files(slow_job(tmp_path / "jobs")))
    waiter = subprocess.Popen([SAGMQ, "wait", job_id, "--json"], env={**os.environ, **system.env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = subprocess.Popen([SAGMQ, "watch", "--job", job_id], env={**os.environ, **system.env},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        start_watch_in_tmux(system, job_id, session, tmp_path)
        check_status_during_the_job(system, job_id)

        refused = cli(system, "teardown")
        assert refused.returncode == 1 and f"job {job_id} is running" in refused.stderr and "--force" in refused.stderr

        expected = [f"job {job_id[:8]} (slow-sag) running: round ", "phase training", "this round",
                    "│ site-1 │ yes", "│ site-2 │ yes", "│ training", "│ accepted", "1 of 2 accepted",
                    f"│ {system.settings.prefix}.results ", "last rounds"]
        screens: list[str] = []

        def shows_a_round() -> bool:
            screens.append(tmux_screen(session))
            return all(x in screens[-1] for x in expected)
        try:
            wait_for(shows_a_round, 30, "watch to show a round in progress", 0.2)
        except AssertionError as e:
            missing = [x for x in expected if x not in screens[-1]]
            raise AssertionError(f"{e}: {missing} missing from the last screen:\n{screens[-1]}") from None

        out, err = waiter.communicate(timeout=90)
        assert waiter.returncode == 0, err
        events = [json.loads(x) for x in out.splitlines()]
        assert [e["record"]["round"] for e in events if e["event"] == "round"] == list(range(ROUNDS))
        assert events[-1] == {"event": "end", "job_id": job_id, "status": "finished", "reason": ""}

        final = wait_for(lambda: (lambda s: s if "WATCH-EXIT=" in s else None)(tmux_screen(session)), 20,
                         "watch to exit with the job")
        assert "WATCH-EXIT=0" in final and f"job {job_id[:8]} (slow-sag) finished after {ROUNDS} round(s)" in final
        assert f"│ {ROUNDS - 1}     │ 2 accepted" in final  # the last round in the rounds table

        lout, _ = lines.communicate(timeout=30)
        assert lines.returncode == 0
        assert f"job {job_id[:8]} (slow-sag) finished" in lout.splitlines()[-1]
        assert any(": 1/2 accepted, pending site-2" in x for x in lout.splitlines()), lout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, check=False)
        for p in (waiter, lines):
            if p.poll() is None:
                p.kill()
                p.communicate()

    jobs = json.loads(ok(cli(system, "list", "--json")))
    assert [(j["job_id"], j["status"]) for j in jobs] == [(job_id, "finished")]
    dead = json.loads(ok(cli(system, "dead", "list", "--json")))
    assert dead["total"] == 0 and dead["messages"] == [] and dead["exists"]

    png = tmp_path / "rounds.png"
    assert f"plot of {ROUNDS} round(s) of job {job_id}" in ok(cli(system, "plot", job_id[:8], "--out", str(png)))
    drawn = read_series(png)
    assert drawn["rounds"] == list(range(ROUNDS)) and drawn["accepted"] == [2] * ROUNDS
    assert all(s is not None and 3.5 < s < 12 for s in drawn["seconds"])  # site-2 trains for 4 s a round
    assert 20_000 < png.stat().st_size < 500_000

    out = tmp_path / "out"
    text = ok(cli(system, "download", job_id, "--out", str(out), timeout=60))
    assert f"plot of {ROUNDS} round(s) written to {out / 'plot.png'}" in text
    assert read_series(out / "plot.png")["rounds"] == list(range(ROUNDS))

    system.stack.stop_all()  # the services stop: nothing declares the queues again
    torn = ok(cli(system, "teardown"))
    assert f"teardown of prefix {system.settings.prefix}: deleted" in torn
    left = [q["name"] for q in json.loads(ok(cli(system, "status", "--json")))["queues"]
            if not q["name"].endswith((".server.admin", ".persistor", ".results", ".server", ".aggregator",
                                       ".dead"))]
    assert left == [], left  # the site queues are gone (status's own client declared the service queues anew)


def _files(job: Path) -> dict[str, bytes]:
    from sagmq.job.spec import read_job_folder

    return read_job_folder(job)


def test_teardown_and_status_without_a_server(settings: Any, management: str) -> None:
    env = {"SAGMQ_AMQP_URL": settings.amqp_url, "SAGMQ_PREFIX": settings.prefix}
    base = {k: v for k, v in os.environ.items() if not k.startswith("SAGMQ_")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SAGMQ, *args], env={**base, **env}, capture_output=True, text=True, timeout=30,
                              check=False)

    st = run("status")
    assert st.returncode == 0, st.stderr
    assert f"SERVER  no server: nobody consumes {settings.prefix}.server.admin" in st.stdout
    assert f"{settings.prefix}.results" in st.stdout
    t0 = time.monotonic()
    torn = run("teardown")
    queues = len(service_topology(settings.prefix).queues)  # what status's own client declared
    assert torn.returncode == 0 and time.monotonic() - t0 < 10, torn
    assert f"deleted {queues} queue(s)" in torn.stdout and "listed by the management API" in torn.stdout
