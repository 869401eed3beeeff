"""The operator's views without a broker: status text, watch lines, plot series and PNG, error wording."""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path
from typing import Any

import pika.exceptions as px
import pytest
from PIL import Image

from sagmq.amqp.connection import explain, unavailable
from sagmq.cli.plot import plot_beside_history, plot_rounds, read_series, round_metrics, series
from sagmq.cli.status import age, render, size
from sagmq.cli.watch import line
from sagmq.wire.settings import unknown_variables


def _record(r: int, accepted: list[str], rejected: list[str] = (), seconds: float = 1.5,  # type: ignore[assignment]
            **extra: Any) -> dict[str, Any]:
    return {"round": r, "task_id": f"t{r}", "targets": accepted + list(rejected), "accepted": accepted,
            "aggregated": accepted, "rejected": [{"site": s, "rc": "EXECUTION_EXCEPTION", "reason": "boom"}
                                                 for s in rejected],
            "started_at": 0.0, "seconds": seconds, **extra}


def snapshot() -> dict[str, Any]:
    return {"taken_at": "2026-01-01T00:00:00+00:00", "prefix": "sag", "broker": "amqp://***@h:5672/%2F",
            "server": True, "server_error": "",
            "sites": [{"site": "site-1", "alive": True, "seen_s_ago": 0.4, "host": "h1", "busy_job": "abcdef0123",
                       "busy_round": 1},
                      {"site": "site-2", "alive": False, "seen_s_ago": 75.0, "host": "h2", "busy_job": "",
                       "busy_round": -1}],
            "running": {"job_id": "abcdef0123", "name": "hello", "status": "running", "reason": "",
                        "current_round": 1, "first_round": 0, "last_round": 2, "phase": "training",
                        "waiting_for": "sites: results of round 1 from site-2 (for 3 s)",
                        "open_round": {"round": 1, "targets": ["site-1", "site-2"], "accepted": ["site-1"],
                                       "rejected": []},
                        "rounds_done": 1, "recent_rounds": [_record(0, ["site-1", "site-2"])]},
            "queued": [{"job_id": "ffff00001111", "name": "next", "submitted_at": 0.0}],
            "queues": [{"name": "sag.results", "messages": 3, "ready": 2, "unacked": 1, "consumers": 1,
                        "bytes": 3 * 2**20, "publish_rate": 1.5, "deliver_rate": 1.0, "ack_rate": 1.0},
                       {"name": "sag.dead", "messages": 2, "ready": 2, "unacked": None, "consumers": 0,
                        "bytes": None, "publish_rate": None, "deliver_rate": None, "ack_rate": None}],
            "queues_from": "management API http://h:15672", "dead_letters": 2}


def test_render_shows_sites_the_round_the_queue_and_queues() -> None:
    text = render(snapshot())
    assert "SITES  1 of 2 alive" in text
    assert "site-2  NO     1 min 15 s ago" in text
    assert "job abcdef01 round 1" in text  # what site-1 runs
    assert "RUNNING JOB  abcdef01 (hello) running: round 1 (0..2), phase training" in text
    assert "round 1: accepted 1 of 2 expected (site-1); pending site-2" in text
    assert "QUEUED JOBS  1" in text and "ffff0000  next" in text
    assert "sag.results  3         2      1        1          3.0 MB  1.5   1.0" in text
    assert "sag.dead     2         2      -        0          -" in text
    assert "dead letters: 2 in sag.dead" in text


def test_render_without_a_server_still_shows_the_queues() -> None:
    snap = {**snapshot(), "server": False, "server_error": "no server: nobody consumes sag.server.admin",
            "sites": [], "running": None, "queued": []}
    text = render(snap)
    assert "SERVER  no server: nobody consumes sag.server.admin" in text
    assert "sag.results" in text


def test_watch_line_follows_the_round() -> None:
    snap = {**snapshot(), "job": snapshot()["running"]}
    text = line(snap)
    assert text.startswith("job abcdef01 (hello) running: round 1 (0..2), phase training: 1/2 accepted, "
                           "pending site-2")
    assert "sites 1/2 alive" in text and "2 queues, 5 message(s) waiting, 2 dead" in text
    assert "(for 3 s)" not in text  # no clock: a line is printed only when something changed


@pytest.mark.parametrize(("seconds", "text"), [(0.44, "0.4 s"), (42, "42 s"), (600, "10 min 0 s"),
                                               (9000, "2.5 h"), (3 * 86400, "3.0 d"), (None, "-")])
def test_age(seconds: float | None, text: str) -> None:
    assert age(seconds) == text


def test_size() -> None:
    assert [size(0), size(2048), size(5 * 2**20), size(3 * 2**30), size(None)] == ["0 B", "2.0 KB", "5.0 MB",
                                                                                   "3.0 GB", "-"]


def test_series_counts_sites_and_averages_metrics_over_sites() -> None:
    history = [_record(1, ["a"], ["b"], 2.0, metrics={"a": {"loss": 1.0, "accuracy": 0.5},
                                                      "b": {"loss": 3.0}}),
               _record(0, ["a", "b"], seconds=1.0, metrics={"loss": 4.0}),
               _record(2, ["a", "b"], seconds=0.5)]
    s = series(history)
    assert s["rounds"] == [0, 1, 2] and s["seconds"] == [1.0, 2.0, 0.5]
    assert s["accepted"] == [2, 1, 2] and s["rejected"] == [0, 1, 0]
    assert s["metrics"] == {"accuracy": [None, 0.5, None], "loss": [4.0, 2.0, None]}
    assert round_metrics({"metrics": {"loss": True}}) == {}


def test_plot_writes_a_real_png_carrying_what_it_drew(tmp_path: Path) -> None:
    history = [_record(r, ["site-1", "site-2"], ["site-3"] if r == 2 else [], seconds=0.5 + r,
                       metrics={"site-1": {"loss": 1.0 / (r + 1)}}) for r in range(5)]
    out = tmp_path / "p.png"
    drawn = plot_rounds(history, out, "a job")
    with Image.open(out) as im:
        assert im.format == "PNG" and 700 <= im.width <= 1200 and 500 <= im.height <= 1400
        assert len(im.convert("L").getcolors(maxcolors=4096) or []) > 20  # drawn, not blank
    back = read_series(out)
    assert back == drawn and back["rounds"] == [0, 1, 2, 3, 4] and back["rejected"] == [0, 0, 1, 0, 0]
    assert back["metrics"]["loss"][4] == pytest.approx(0.2)


def test_plot_beside_history_and_its_failures(tmp_path: Path) -> None:
    assert "no history.json" in plot_beside_history(tmp_path)
    (tmp_path / "history.json").write_text("[]")
    assert plot_beside_history(tmp_path) == "plot.png not written: the job has no finished round to plot"
    (tmp_path / "history.json").write_text(json.dumps([_record(0, ["a"])]))
    (tmp_path / "meta.json").write_text(json.dumps({"name": "hello"}))
    assert plot_beside_history(tmp_path).startswith("plot of 1 round(s) written to")
    assert read_series(tmp_path / "plot.png")["rounds"] == [0]


def test_unknown_variables_name_the_closest_known_one() -> None:
    env = {"SAGMQ_AMQP_ULR": "amqp://x", "SAGMQ_HEARTBEAT": "1", "SAGMQ_ZZZ": "1", "SAGMQ_PREFIX": "p",
           "SAGMQ_EXIT_WITH_PARENT": "1", "OTHER": "x"}
    assert unknown_variables(env) == [("SAGMQ_AMQP_ULR", "SAGMQ_AMQP_URL"), ("SAGMQ_HEARTBEAT", "SAGMQ_HEARTBEAT_S"),
                                      ("SAGMQ_ZZZ", "")]


URL = "amqp://bob:pw@broker.example:5673/prod"


def test_explain_fits_the_fix_to_the_cause() -> None:
    refused = px.AMQPConnectionError(ConnectionRefusedError(111, "Connection refused"))
    reason, hint = explain(URL, refused)
    assert reason == "connection refused at broker.example:5673" and "is a RabbitMQ broker running" in hint
    reason, hint = explain(URL, px.ProbableAuthenticationError("(403) 'ACCESS_REFUSED - Login was refused'"))
    assert "refused the credentials of user 'bob'" in reason and "user and password in SAGMQ_AMQP_URL" in hint
    assert "rabbitmq-server" not in hint
    reason, hint = explain(URL, px.ProbableAccessDeniedError("(530) 'NOT_ALLOWED - vhost prod not found'"))
    assert reason == "vhost 'prod' does not exist on the broker at broker.example:5673"
    assert "rabbitmqctl add_vhost prod" in hint
    reason, hint = explain(URL, ssl.SSLError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"))
    assert reason.startswith("TLS handshake with broker.example:5673 failed") and "SAGMQ_TLS_CA_FILE" in hint
    reason, _ = explain(URL, socket.gaierror(-2, "Name or service not known"))
    assert reason == "cannot resolve the host of broker.example:5673 (Name or service not known)"
    e = unavailable(URL, refused)
    assert str(e) == ("cannot reach RabbitMQ at amqp://***@broker.example:5673/prod: connection refused at "
                      "broker.example:5673")
    assert e.hint.startswith("is a RabbitMQ broker running at broker.example:5673?")


class _Admin:
    """Status replies in turn, the last one repeated (what wait_job polls)."""

    def __init__(self, replies: list[dict[str, Any]]) -> None:
        self.replies = replies

    def status(self, job_id: str) -> dict[str, Any]:
        return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]


def _transfer(received: int, results: int, task: int = 20 * 2**20) -> dict[str, Any]:
    return {"round": 0, "task_bytes": task, "targets": 3, "sites_received": received,
            "received_bytes": received * task, "total_bytes": 3 * task, "results": results}


def _running(transfer: dict[str, Any], status: str = "running") -> dict[str, Any]:
    return {"job_id": "j" * 32, "status": status, "phase": "training", "waiting_for": "", "history": [],
            "transfer": transfer}


def test_wait_tells_the_transfer_of_a_large_model_once_per_change() -> None:
    import io

    from sagmq.cli.jobs import format_transfer, wait_job

    steps = [_transfer(0, 0), _transfer(0, 0), _transfer(2, 0), _transfer(3, 0), _transfer(3, 1), _transfer(3, 1)]
    out = io.StringIO()
    wait_job(_Admin([*map(_running, steps), _running({}, "finished")]), "j", 5, out, as_json=True)  # type: ignore[arg-type]
    progress = [json.loads(x) for x in out.getvalue().splitlines() if '"progress"' in x]
    assert [(p["received_bytes"] // 2**20, p["results"]) for p in progress] == [(0, 0), (40, 0), (60, 0), (60, 1)]
    assert format_transfer(_transfer(2, 1)) == "round 0: task 40.0/60.0 MB at 3 sites (2 received), results 1 of 3"
    small = io.StringIO()  # a small model: no transfer lines
    wait_job(_Admin([_running(_transfer(1, 0, 2**20)), _running({}, "finished")]), "j", 5, small)  # type: ignore[arg-type]
    assert "MB" not in small.getvalue()


def test_job_view_shows_cross_site_evaluation() -> None:
    from sagmq.cli.status import render_job

    st = {"job_id": "c" * 32, "name": "cse", "status": "running", "reason": "", "current_round": 1,
          "history": [_record(0, ["site-1", "site-2"])],
          "cross_site_eval": {"phase": "validating", "participants": ["site-1", "site-2"], "missing": [],
                              "models": ["SRV_server", "site-1"], "waiting_for": {"site-1": ["site-2"]},
                              "results": {"site-1": {"SRV_server": {"accuracy": 0.75}}},
                              "failures": [{"site": "site-2", "model_owner": "SRV_server", "reason": "timeout"}],
                              "for_s": 2.0}}
    text = render_job(st)
    assert "  cross-site evaluation: validating (for 2.0 s)" in text
    assert "    participants: site-1, site-2" in text and "    models: SRV_server, site-1" in text
    assert "    waits for site-2 to validate site-1" in text
    assert "    site-1: SRV_server accuracy=0.75" in text
    assert "    failed: site-2 on SRV_server: timeout" in text
    assert "cross-site" not in render_job({**st, "cross_site_eval": {}})


def test_reported_metrics_take_numbers_from_the_meta_only() -> None:
    from sagmq.wire.messages import reported_metrics

    assert reported_metrics({"NUM_STEPS_CURRENT_ROUND": 1}) == {}  # NVFlare's NPTrainer reports none
    meta = {"metrics": {"loss": 0.5, "acc": 1, "bad": float("nan"), "flag": True, "text": "x", "x" * 65: 1.0},
            "initial_metrics": 0.25}
    assert reported_metrics(meta) == {"loss": 0.5, "acc": 1.0, "initial_metrics": 0.25}
    assert len(reported_metrics({"metrics": {f"m{i}": i for i in range(100)}})) == 32
    assert reported_metrics(None) == {} and reported_metrics({"metrics": [1, 2]}) == {}


def test_round_record_keeps_the_sites_metrics() -> None:
    from sagmq.server.scatter_and_gather import RoundRecord

    rec = RoundRecord(0, "t0", ["site-1"], 1.0, ["site-1"], metrics={"site-1": {"loss": 0.5}})
    d = rec.to_dict()
    assert d["metrics"] == {"site-1": {"loss": 0.5}} and RoundRecord.from_dict(d) == rec
    assert "metrics" not in RoundRecord(0, "t0", [], 1.0).to_dict()
    assert round_metrics(d) == {"loss": 0.5}


def test_status_and_watch_show_a_large_models_transfer() -> None:
    from rich.console import Console

    from sagmq.cli.watch import rich_view

    job = {**snapshot()["running"], "transfer": _transfer(2, 1)}
    snap = {**snapshot(), "running": job, "job": job}
    assert "  transfer: round 0: task 40.0/60.0 MB at 3 sites (2 received), results 1 of 3" in render(snap)
    assert ", task 40.0 MB of 60.0 MB received;" in line(snap)
    console = Console(width=160, record=True, force_terminal=False)
    console.print(rich_view(snap, 1.0))
    assert "task 40.0/60.0 MB at 3 sites (2 received), results 1 of 3" in console.export_text()
    small = {**job, "transfer": _transfer(2, 1, 2**20)}  # a small model: not told
    assert "transfer" not in render({**snap, "running": small}) and "MB" not in line({**snap, "job": small})


def test_a_rounds_line_tells_the_metrics_the_sites_reported() -> None:
    from sagmq.cli.jobs import format_round

    h = _record(1, ["site-1", "site-2"], close_reason="all 2 targets answered",
                metrics={"site-1": {"loss": 0.5}, "site-2": {"loss": 0.25, "accuracy": 0.9}})
    assert format_round(h) == ("round 1: 2 accepted (site-1, site-2) in 1.500 s [all 2 targets answered]; "
                               "accuracy 0.9, loss 0.375")
    assert format_round(_record(1, ["site-1"])).endswith("in 1.500 s")


def test_unknown_variables_are_found_when_another_setting_is_invalid() -> None:
    env = {"SAGMQ_HEARTBEAT_S": "often", "SAGMQ_AMQP_ULR": "amqp://x", "SAGMQ_PREFIX": "bad name!"}
    assert unknown_variables(env) == [("SAGMQ_AMQP_ULR", "SAGMQ_AMQP_URL")]  # the invalid ones are known names
