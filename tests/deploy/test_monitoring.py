"""The `monitoring` profile: Prometheus scrapes the broker's per-queue metrics and every sagmq service's."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.deploy.stack import SERVICES, Stack, wait_until
from tests.unit.test_metrics import metric_names

DASHBOARDS = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"


def _api(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


def test_prometheus_scrapes_sagmq_and_broker_metrics(stack: Stack) -> None:
    stack.compose("up", "-d", "--scale", "client=2", *SERVICES, "prometheus", timeout=300)
    stack.wait_healthy()
    job = stack.compose("run", "--rm", "job", timeout=300, check=False)
    assert job.returncode == 0, job.stdout[-6000:]
    port = stack.compose("port", "prometheus", "9090").stdout.strip().rsplit(":", 1)[1]
    base = f"http://127.0.0.1:{port}"

    def all_targets_up() -> list[dict[str, Any]] | None:
        active = _api(base, "/api/v1/targets")["activeTargets"]
        by_job: dict[str, int] = {}
        for t in active:
            if t["health"] == "up":
                by_job[t["labels"]["job"]] = by_job.get(t["labels"]["job"], 0) + 1
        # server, aggregator, persistor and two clients; the broker's two endpoints
        return active if by_job == {"sagmq": 5, "rabbitmq": 1, "rabbitmq-per-object": 1} else None

    wait_until(all_targets_up, 90, "every scrape target up", interval=2)

    def value(query: str) -> list[dict[str, Any]]:
        return list(_api(base, "/api/v1/query", query=query)["result"])

    def rounds_finished() -> float | None:
        # (a scrape taken while the job ran holds fewer: wait for one taken after its end)
        got = value("sum(sagmq_rounds_finished_total)")
        return float(got[0]["value"][1]) if got and float(got[0]["value"][1]) >= 3 else None

    assert wait_until(rounds_finished, 60, "sagmq_rounds_finished_total >= 3 (the job's three rounds)") >= 3
    sites = {r["metric"]["site"] for r in value('sagmq_service_info{service="client"}')}
    assert sites == {"site-1", "site-2"}, sites
    results = wait_until(lambda: value('rabbitmq_queue_consumers{queue="sag.results"}'), 60, "per-queue metrics")
    assert float(results[0]["value"][1]) >= 1  # the aggregator consumes the results queue
    assert value('rabbitmq_queue_messages_ready{queue="sag.server"}')

    # every metric a dashboard reads is one this stack really exports
    names = set(_api(base, "/api/v1/label/__name__/values"))
    for board in DASHBOARDS.glob("*.json"):
        for panel in json.loads(board.read_text())["panels"]:
            for target in panel["targets"]:
                missing = metric_names(target["expr"]) - names
                assert not missing, f"{board.name} / {panel['title']}: {sorted(missing)} not exported"

    # the alert rules of deploy/prometheus/alerts.yml are loaded
    groups = _api(base, "/api/v1/rules")["groups"]
    assert groups and all(g["rules"] for g in groups), groups
