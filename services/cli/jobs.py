"""Following a job and writing its files: what `sagmq wait`, `download` and `poc` share."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from sagmq.wire.errors import SagmqError
from sagmq.wire.messages import ABORTED, FAILED, FINISHED

if TYPE_CHECKING:  # only for the annotation: importing it would load the broker client
    from sagmq.cli.admin import AdminClient


def write_files(out: Path, files: dict[str, bytes]) -> None:
    """Write downloaded files under out, refusing paths that escape it."""
    root = out.resolve()
    for rel, data in files.items():
        target = (root / rel).resolve()
        if root not in target.parents:
            raise SagmqError(f"refusing to write {rel!r} outside {out}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


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
    return text + (f" [{h['close_reason']}]" if h.get("close_reason") else "")


def wait_job(admin: AdminClient, job_id: str, timeout_s: float | None, out: TextIO = sys.stdout) -> dict[str, Any]:
    """Poll a job's status, printing each finished round, until it ends or time runs out."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    shown = 0
    while True:
        st = admin.status(job_id)
        for h in st.get("history", [])[shown:]:
            print(format_round(h), file=out, flush=True)
        shown = len(st.get("history", []))
        if st["status"] in (FINISHED, FAILED, ABORTED):
            return st
        if deadline is not None and time.monotonic() > deadline:
            raise SagmqError(f"job {job_id} still {st['status']} after {timeout_s:g} s")
        time.sleep(0.1)
