"""`sagmq bench` end to end, small: the floor, the job through the real services, the report."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import SAGMQ

pytestmark = [pytest.mark.e2e, pytest.mark.broker]


def test_bench_reports_rounds_floor_ratio_memory_and_correctness(amqp_url: str, tmp_path: Path) -> None:
    # 1.2 MB in 256 KiB parts: multi-part messages, and the model forwarded with the aggregate
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SAGMQ_")}, "SAGMQ_AMQP_URL": amqp_url}
    p = subprocess.run([SAGMQ, "bench", "--clients", "2", "--floats", "300000", "--rounds", "3",
                        "--chunk-mb", "0.25", "--json", "--workspace", str(tmp_path / "ws"), "--keep"],
                       env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(p.stdout)
    assert report["correct"] is True
    assert len(report["round_s"]) == 3 and all(x > 0 for x in report["round_s"])
    assert len(report["floor_round_s"]) == 3 and report["floor_round_s_median"] > 0
    assert report["ratio"] == pytest.approx(report["round_s_median"] / report["floor_round_s_median"])
    assert set(report["peak_rss_mb"]) == {"server", "aggregator", "persistor", "client_max", "client_median"}
    assert all(v > 10 for v in report["peak_rss_mb"].values())
    assert report["status_s"]["count"] >= 1
    cpu, floor_cpu = report["cpu_ms_per_round"], report["floor_cpu_ms_per_round"]
    assert set(cpu) == {"server", "aggregator", "persistor", "sites", "broker", "total"}
    assert all(cpu[k] > 0 for k in ("server", "aggregator", "persistor", "sites"))
    assert cpu["total"] == pytest.approx(sum(v for k, v in cpu.items() if k != "total"), abs=0.05)
    assert floor_cpu["publisher"] > 0 and floor_cpu["clients"] > 0 and report["cores"] >= 1
    server_log = (tmp_path / "ws" / "logs" / "server.log").read_text()
    assert "model forwarded with the aggregate to site-1, site-2" in server_log, server_log
