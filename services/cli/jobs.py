"""Following a job and writing its files: what `sagmq wait`, `download` and `poc` share."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from sagmq.wire.errors import BrokerUnavailable, SagmqError, UsageError
from sagmq.wire.messages import ABORTED, FAILED, FINISHED

if TYPE_CHECKING:  # only for the annotation: importing it would load the broker client
    from sagmq.cli.admin import AdminClient

log = logging.getLogger(__name__)

PROGRESS_MIN_BYTES = 4 * 2**20  # a round's task this large gets its transfer progress told
FOLLOW_OUTAGE_S = 120.0  # `wait` asks again for this long when nobody answers (a broker failover, a restart)


def write_files(out: Path, files: dict[str, bytes]) -> None:
    """Write downloaded files under out, refusing paths that escape it."""
    root = out.resolve()
    for rel, data in files.items():
        target = (root / rel).resolve()
        if root not in target.parents:
            raise SagmqError(f"refusing to write {rel!r} outside {out}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def final_model_text(out: Path) -> str:
    """The downloaded final model as `download` and `poc` print it: models/server.npy (one array) or
    models/server.npz (several, each by name), the names the persistor saves them under; "" if neither."""
    import numpy as np

    models = out / "models"
    for name in ("server.npy", "server.npz"):
        path = models / name
        if path.is_file():
            loaded = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    body = "\n".join(f"{k}:\n{loaded[k]}" for k in loaded.files)
            else:
                body = str(loaded)
            return f"final model {path}:\n{body}"
    return ""


def format_round(h: dict[str, Any]) -> str:
    """One line of progress for a finished round."""
    rej = h.get("rejected") or []
    text = f"round {h['round']}: {len(h.get('aggregated', h.get('accepted', [])))} accepted"
    if h.get("aggregated"):
        text += f" ({', '.join(h['aggregated'])})"
    if rej:
        text += f", {len(rej)} rejected (" + "; ".join(f"{x['site']}: {x['reason']}" for x in rej) + ")"
    if "seconds" in h:
        text += f" in {h['seconds']:.3f} s"
    text += f" [{h['close_reason']}]" if h.get("close_reason") else ""
    if h.get("metrics"):  # what the sites reported, each name's mean over them
        from sagmq.cli.plot import round_metrics

        text += "; " + ", ".join(f"{k} {v:.4g}" for k, v in round_metrics(h).items())
    return text


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


def large_transfer(job: dict[str, Any]) -> dict[str, Any] | None:
    """A status reply's transfer of the open round, if its task is large enough to tell (else None)."""
    t = job.get("transfer") or {}
    return t if int(t.get("task_bytes") or 0) >= PROGRESS_MIN_BYTES else None


def format_transfer(t: dict[str, Any]) -> str:
    """The open round's transfer progress, from a status reply's ``transfer`` (the sites' heartbeats say
    which of them received the task whole): "round 2: task 40.0/60.0 MB at 3 sites (2 received), results 1 of 3"."""
    n = int(t["targets"])
    return (f"round {t['round']}: task {_mb(int(t['received_bytes']))}/{_mb(int(t['total_bytes']))} MB at {n} "
            f"site{'s' if n != 1 else ''} ({t['sites_received']} received), results {t['results']} of {n}")


def job_folder(path: str | Path) -> Path:
    """A job folder argument, checked: it must exist and be a directory (UsageError naming the path)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"job folder {p} does not exist")
    if not p.is_dir():
        raise UsageError(f"job folder {p} is not a directory")
    return p


def _steady(text: str) -> str:
    """A waiting_for text without its running clock ("(for 3 s)"), so a change of cause is what shows."""
    return re.sub(r" \(for \d+ s\)", "", text)


def _worth_telling(phase: str, waiting_for: str) -> bool:
    """A queued job's or a waiting round's cause at once; a round's usual work once it takes 5 s."""
    if phase not in ("training", "aggregating", "loading", "saving"):
        return True
    m = re.search(r"\(for (\d+) s\)", waiting_for)
    return m is not None and int(m.group(1)) >= 5


def _event(out: TextIO, as_json: bool, kind: str, job_id: str, text: str, **fields: Any) -> None:
    if as_json:
        print(json.dumps({"event": kind, "job_id": job_id, **fields}, default=str), file=out, flush=True)
    else:
        print(text, file=out, flush=True)


def wait_job(admin: AdminClient, job_id: str, timeout_s: float | None, out: TextIO = sys.stdout,
             as_json: bool = False) -> dict[str, Any]:
    """Poll a job's status until it ends or time runs out, printing each finished round and each change
    of what the job waits for (sites connecting, "2 of 5 connected"); as_json: one JSON line per event.
    No answer (the broker node it reached killed, the server restarting) is asked again for up to
    FOLLOW_OUTAGE_S: the job is followed across a reconnect to another broker of SAGMQ_AMQP_URL."""
    from sagmq.cli.admin import NoAnswer

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    shown, waits, status, moved = 0, "", "", None
    lost_since: float | None = None
    while True:
        try:
            st = admin.status(job_id)
        except (NoAnswer, BrokerUnavailable) as e:
            # a broker node or the server going away: the bus reconnects (the next broker of SAGMQ_AMQP_URL)
            # and the next status request follows the job there, for up to FOLLOW_OUTAGE_S without an answer
            now = time.monotonic()
            if lost_since is None:
                lost_since = now
                log.warning("job %s: no answer (%s); asking again", job_id[:8], e)
            if now - lost_since > FOLLOW_OUTAGE_S or (deadline is not None and now > deadline):
                raise
            time.sleep(1.0)
            continue
        if lost_since is not None:
            log.warning("job %s: answered again after %.1f s", job_id[:8], time.monotonic() - lost_since)
            lost_since = None
        for h in st.get("history", [])[shown:]:
            _event(out, as_json, "round", st["job_id"], format_round(h), record=h)
        shown = len(st.get("history", []))
        if st["status"] != status:
            status = st["status"]
            _event(out, as_json, "status", st["job_id"], f"job {st['job_id'][:8]} {status}", status=status)
        w = st.get("waiting_for") or ""
        if w and _steady(w) != waits and _worth_telling(st.get("phase", ""), w):
            _event(out, as_json, "waiting", st["job_id"], f"waiting for {w}", waiting_for=w,
                   phase=st.get("phase", ""))
            waits = _steady(w)
        t = large_transfer(st)
        if t is not None:  # a large model: bytes received, results gathered
            step = (t["round"], t["received_bytes"], t["results"])
            if step != moved:
                _event(out, as_json, "progress", st["job_id"], format_transfer(t), **t)
                moved = step
        if st["status"] in (FINISHED, FAILED, ABORTED):
            return st
        if deadline is not None and time.monotonic() > deadline:
            raise SagmqError(f"job {job_id} still {st['status']} after {timeout_s:g} s"
                             + (f", waiting for {w}" if w else ""))
        time.sleep(0.1)
