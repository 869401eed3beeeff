"""`sagmq bench-plot`: bench runs grouped by model size, medians by number of sites, a real PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sagmq.cli.benchplot import plot_bench, read_runs, series
from sagmq.cli.plot import read_series
from sagmq.wire.errors import UsageError


def run(clients: int, floats: int, s: float, floor: float, cpu_sites: float = 1.0) -> dict[str, Any]:
    return {"clients": clients, "floats": floats, "round_s_median": s, "floor_round_s_median": floor,
            "ratio": s / floor, "correct": True,
            "cpu_ms_per_round": {"sites": cpu_sites, "broker": 2.0, "server": 0.5, "aggregator": 0.5,
                                 "persistor": 0.25, "total": 4.25}}


def test_series_groups_by_model_size_and_takes_medians() -> None:
    runs = [run(2, 9, 0.004, 0.002), run(2, 9, 0.006, 0.002), run(2, 9, 0.010, 0.002, cpu_sites=3.0),
            run(1000, 9, 1.0, 0.6), run(8, 50_000_000, 10.0, 9.0)]
    data = series(runs)
    assert list(data) == ["9", "50000000"]
    assert data["9"]["clients"] == [2, 1000]
    assert data["9"]["runs"] == [3, 1]
    assert data["9"]["round_s"] == [0.006, 1.0]
    assert data["9"]["floor_s"] == [0.002, 0.6]
    assert data["9"]["ratio"] == pytest.approx([3.0, 1.0 / 0.6])
    assert data["9"]["cpu_ms"]["sites"] == [1.0, 1.0]
    assert data["50000000"]["clients"] == [8]


def test_plot_is_a_png_carrying_what_it_drew(tmp_path: Path) -> None:
    runs = [run(n, 9, 0.004 * n, 0.002 * n) for n in (2, 10, 100, 1000)]
    out = tmp_path / "sites.png"
    data = plot_bench(runs, out)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 400
    assert read_series(out) == json.loads(json.dumps(data))
    assert read_series(out)["9"]["clients"] == [2, 10, 100, 1000]


def test_bad_input_is_refused_with_the_reason(tmp_path: Path) -> None:
    f = tmp_path / "runs.jsonl"
    f.write_text('{"clients": 2}\n')
    with pytest.raises(UsageError, match="round_s_median missing"):
        read_runs([f])
    f.write_text("not json\n")
    with pytest.raises(UsageError, match=r"runs\.jsonl:1: not a JSON object"):
        read_runs([f])
    f.write_text("\n")
    with pytest.raises(UsageError, match="no bench runs"):
        read_runs([f])
    with pytest.raises(UsageError, match="cannot read it"):
        read_runs([tmp_path / "missing.jsonl"])
    with pytest.raises(UsageError, match="PNG"):
        plot_bench([run(2, 9, 1.0, 1.0)], tmp_path / "x.jpg")


def test_the_command_reads_bench_lines_and_says_where_it_wrote(tmp_path: Path) -> None:
    f = tmp_path / "runs.jsonl"
    f.write_text("\n".join(json.dumps(run(n, 9, 0.01, 0.005)) for n in (2, 10)) + "\n")
    out = tmp_path / "p.png"
    r = subprocess.run([sys.executable, "-m", "sagmq.cli.main", "bench-plot", str(f), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "plot of 2 bench run(s) in 1 model size(s)" in r.stdout
    assert out.is_file()
