"""`sagmq plot JOB --out FILE.png`: a picture of a job's rounds.

Three panels from the round records (the job's history): seconds per round; sites accepted and
rejected per round; and any metric the sites reported (a round record's ``metrics``: either
``{name: number}`` or ``{site: {name: number}}``, averaged over the sites), when there is one.
The plotted series travel inside the PNG as a text chunk (``sagmq-series``, JSON), so a test
or a script can read back exactly what was drawn. matplotlib (the ``plot`` extra) is loaded
only here, with its Agg backend: no display is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sagmq.wire.errors import SagmqError, UsageError
from sagmq.wire.settings import Settings

SERIES_KEY = "sagmq-series"
MISSING = "matplotlib is not installed (pip install 'sagmq[plot]')"


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed); SagmqError(MISSING) without the plot extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SagmqError(MISSING) from e
    return plt


def require_png(out: Path) -> None:
    """Refuse an --out that is not a *.png."""
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: the plot is a PNG; name the file *.png")


def _numbers(d: Any) -> dict[str, float]:
    """The numeric values of a flat {name: number} map."""
    if not isinstance(d, dict):
        return {}
    return {str(k): float(v) for k, v in d.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def round_metrics(h: dict[str, Any]) -> dict[str, float]:
    """A round's metrics: {name: number} as reported, or each name's mean over the sites' {site: {name: number}}."""
    raw = h.get("metrics")
    flat = _numbers(raw)
    if flat or not isinstance(raw, dict):
        return flat
    per_site = [_numbers(v) for v in raw.values() if isinstance(v, dict)]
    names = sorted({n for m in per_site for n in m})
    return {n: sum(m[n] for m in per_site if n in m) / sum(1 for m in per_site if n in m) for n in names}


def series(history: list[dict[str, Any]]) -> dict[str, Any]:
    """What the plot draws, by round: seconds, accepted and rejected counts, and each metric."""
    rows = sorted((h for h in history if isinstance(h, dict) and "round" in h), key=lambda h: int(h["round"]))
    metrics: dict[str, list[float | None]] = {}
    per_round = [round_metrics(h) for h in rows]
    for name in sorted({n for m in per_round for n in m}):
        metrics[name] = [m.get(name) for m in per_round]
    return {"rounds": [int(h["round"]) for h in rows],
            "seconds": [float(h["seconds"]) if h.get("seconds") is not None else None for h in rows],
            "accepted": [len(h.get("aggregated") or h.get("accepted") or []) for h in rows],
            "rejected": [len(h.get("rejected") or []) for h in rows],
            "metrics": metrics}


def plot_rounds(history: list[dict[str, Any]], out: Path, title: str) -> dict[str, Any]:
    """Draw the rounds to a PNG at out; return the series drawn (also stored in the PNG)."""
    plt = pyplot()
    data = series(history)
    if not data["rounds"]:
        raise SagmqError("the job has no finished round to plot")
    panels = 3 if data["metrics"] else 2
    fig, axes = plt.subplots(panels, 1, figsize=(8, 2.6 * panels + 0.6), sharex=True, squeeze=False)
    ax = [a[0] for a in axes]
    x = data["rounds"]
    secs = [s if s is not None else 0.0 for s in data["seconds"]]
    ax[0].bar(x, secs, color="#4c72b0")
    ax[0].set_ylabel("seconds")
    ax[0].set_title("seconds per round")
    ax[1].bar(x, data["accepted"], color="#55a868", label="accepted")
    ax[1].bar(x, data["rejected"], bottom=data["accepted"], color="#c44e52", label="rejected")
    ax[1].set_ylabel("sites")
    ax[1].set_title("sites per round")
    ax[1].set_ylim(0, max(a + r for a, r in zip(data["accepted"], data["rejected"], strict=True)) * 1.35 + 0.5)
    ax[1].legend(loc="upper right", ncol=2)
    ax[1].yaxis.get_major_locator().set_params(integer=True)
    if data["metrics"]:
        for name, values in data["metrics"].items():
            pts = [(r, v) for r, v in zip(x, values, strict=True) if v is not None]
            ax[2].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax[2].set_title("metrics reported by the sites (mean over sites)")
        ax[2].legend(loc="best")
    ax[-1].set_xlabel("round")
    ax[-1].xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, metadata={SERIES_KEY: json.dumps(data)})
    plt.close(fig)
    return data


def read_series(png: Path) -> dict[str, Any]:
    """The series a PNG written by plot_rounds carries."""
    from PIL import Image

    with Image.open(png) as im:
        text = getattr(im, "text", {}) or {}
        return dict(json.loads(text[SERIES_KEY]))


def plot_beside_history(folder: Path) -> str:
    """After `download`: draw folder/history.json to folder/plot.png; what to tell the user."""
    hist = folder / "history.json"
    if not hist.is_file():
        return f"no history.json in {folder}: no plot"
    try:
        history = json.loads(hist.read_text())
        meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
        title = str(meta.get("name", folder.name)) if isinstance(meta, dict) else folder.name
        data = plot_rounds(history if isinstance(history, list) else [], folder / "plot.png", title)
    except (SagmqError, ValueError) as e:
        return f"plot.png not written: {e}"
    return f"plot of {len(data['rounds'])} round(s) written to {folder / 'plot.png'}"


def run_plot(s: Settings, job_id: str, out: Path) -> int:
    """`sagmq plot JOB --out FILE.png`: the job's history from the server, drawn."""
    from sagmq.cli.admin import CLI_CONNECT_S, AdminClient

    require_png(out)
    admin = AdminClient(s, CLI_CONNECT_S, server_grace_s=5.0)
    try:
        st = admin.status(job_id)
    finally:
        admin.close()
    data = plot_rounds(st.get("history", []), out, f"job {st['job_id'][:8]} ({st['name']}) {st['status']}")
    print(f"plot of {len(data['rounds'])} round(s) of job {st['job_id']} written to {out}")
    return 0
