"""`sagmq bench-plot FILE... --out FILE.png`: seconds per round against the number of sites.

Reads the JSON objects that `sagmq bench --json` prints (one per line, any number of files), groups
the runs by model size, and draws each group's median seconds per round against the number of sites
on log-log axes, with the broker floor measured in the same runs beside it (dashed) and each point's
ratio written next to it. Where several runs share a number of sites, the plot takes their median.
A second panel shows CPU milliseconds per round of each service and the broker, by run. As with
`sagmq plot`, the drawn series travel inside the PNG as a ``sagmq-series`` text chunk.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from sagmq.cli.plot import SERIES_KEY, pyplot, require_png
from sagmq.wire.errors import UsageError

CPU_PARTS = ("sites", "broker", "server", "aggregator", "persistor")


def read_runs(paths: list[Path]) -> list[dict[str, Any]]:
    """The bench runs in the files (one JSON object per line; blank lines are skipped)."""
    runs: list[dict[str, Any]] = []
    for path in paths:
        try:
            text = path.read_text()
        except OSError as e:
            raise UsageError(f"{path}: cannot read it: {e.strerror}") from e
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                run = json.loads(line)
            except ValueError as e:
                raise UsageError(f"{path}:{n}: not a JSON object from `sagmq bench --json`: {e}") from e
            if not isinstance(run, dict) or not {"clients", "floats", "round_s_median"} <= set(run):
                raise UsageError(f"{path}:{n}: not a run of `sagmq bench --json` (clients, floats, "
                                 "round_s_median missing)")
            runs.append(run)
    if not runs:
        raise UsageError("no bench runs in " + ", ".join(str(p) for p in paths))
    return runs


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def series(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """What the plot draws: per model size, by number of sites, the median round, floor, ratio and CPU."""
    groups: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for r in runs:
        groups.setdefault(str(int(r["floats"])), {}).setdefault(int(r["clients"]), []).append(r)
    out: dict[str, Any] = {}
    for floats, by_n in sorted(groups.items(), key=lambda kv: int(kv[0])):
        ns = sorted(by_n)
        rows = [by_n[n] for n in ns]
        out[floats] = {
            "clients": ns,
            "runs": [len(rs) for rs in rows],
            "round_s": [_median([float(r["round_s_median"]) for r in rs]) for rs in rows],
            "floor_s": [_median([float(r["floor_round_s_median"]) for r in rs
                                 if r.get("floor_round_s_median") is not None]) for rs in rows],
            "ratio": [_median([float(r["ratio"]) for r in rs if r.get("ratio") is not None]) for rs in rows],
            "correct": [all(bool(r.get("correct")) for r in rs) for rs in rows],
            "cpu_ms": {part: [_median([float(r["cpu_ms_per_round"][part]) for r in rs
                                       if part in (r.get("cpu_ms_per_round") or {})]) for rs in rows]
                       for part in CPU_PARTS},
        }
    return out


def _label(floats: int) -> str:
    for div, unit in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if floats >= div and floats % div == 0:
            return f"{floats // div}{unit} floats"
    return f"{floats} floats"


def plot_bench(runs: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """Draw the runs to a PNG at out; return the series drawn (also stored in the PNG)."""
    require_png(out)
    plt = pyplot()
    data = series(runs)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8.5))
    colours = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]
    for i, (floats, g) in enumerate(data.items()):
        c = colours[i % len(colours)]
        label = _label(int(floats))
        top.plot(g["clients"], g["round_s"], marker="o", color=c, label=f"sagmq, {label}")
        pts = [(n, f) for n, f in zip(g["clients"], g["floor_s"], strict=True) if f is not None]
        if pts:
            top.plot([p[0] for p in pts], [p[1] for p in pts], marker="s", linestyle="--", color=c, alpha=0.7,
                     label=f"broker floor, {label}")
        for n, s, ratio in zip(g["clients"], g["round_s"], g["ratio"], strict=True):
            if ratio is not None:
                top.annotate(f"{ratio:.2f}x", (n, s), textcoords="offset points", xytext=(6, 6), fontsize=8, color=c)
    top.set_xscale("log")
    top.set_yscale("log")
    ticks = sorted({n for g in data.values() for n in g["clients"]})
    top.set_xticks(ticks)
    top.set_xticks([], minor=True)
    top.set_xticklabels([str(n) for n in ticks])
    top.set_xlim(min(ticks) / 1.5, max(ticks) * 1.5)
    top.set_xlabel("sites")
    top.set_ylabel("seconds per round (median)")
    top.set_title("seconds per round against the number of sites (ratio to the floor beside each point)")
    top.grid(True, which="both", alpha=0.3)
    top.legend(loc="lower right", fontsize=8)
    # CPU per round by service and the broker, grouped, for every (model size, sites) measured
    labels = [f"{n} x {_label(int(floats)).split()[0]}" for floats, g in data.items() for n in g["clients"]]
    width = 0.8 / len(CPU_PARTS)
    for j, part in enumerate(CPU_PARTS):
        vals = [v or 0.0 for g in data.values() for v in g["cpu_ms"][part]]
        bottom.bar([x + (j - (len(CPU_PARTS) - 1) / 2) * width for x in range(len(labels))], vals, width=width,
                   color=colours[j % len(colours)], label=part)
    bottom.set_xticks(range(len(labels)))
    bottom.set_xticklabels(labels, rotation=20, fontsize=8)
    bottom.set_yscale("log")
    bottom.set_ylabel("CPU ms per round")
    bottom.set_title("CPU per round, by service and the broker (sites: all of them together)")
    bottom.legend(loc="upper left", fontsize=8, ncol=len(CPU_PARTS))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, metadata={SERIES_KEY: json.dumps(data)})
    plt.close(fig)
    return data


def run_bench_plot(files: list[str], out: str) -> int:
    """`sagmq bench-plot`: read, draw, say where."""
    runs = read_runs([Path(f) for f in files])
    data = plot_bench(runs, Path(out))
    n = sum(sum(g["runs"]) for g in data.values())
    print(f"plot of {n} bench run(s) in {len(data)} model size(s) written to {out}")
    return 0
