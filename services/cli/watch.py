"""`sagmq watch [--job ID]`: the status view, live: redrawn every second with rich on a terminal.

It follows the running job (or the one given) round by round: the open round's progress (which
targets answered, accepted or rejected, which are pending), the last rounds, every site (alive,
last seen, what it runs, what its queue holds: a large model's bytes still to be delivered show
as the queue's bytes), and every queue of the prefix. With ``--job`` it exits when that job ends,
with `sagmq wait`'s exit code. When stdout is not a terminal (a pipe, a log file, ``--lines``) it
prints one line per change instead, so it also works in CI logs and over the plainest SSH session.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from sagmq.cli.jobs import format_round, format_transfer, large_transfer
from sagmq.cli.status import age, job_headline, queue_rows, round_progress, site_doing, size, snapshot
from sagmq.wire.errors import EXIT_FAILED
from sagmq.wire.messages import ABORTED, FAILED, FINISHED
from sagmq.wire.settings import Settings

if TYPE_CHECKING:
    from rich.console import RenderableType

    from sagmq.cli.admin import AdminClient

ENDED = (FINISHED, FAILED, ABORTED)


def view(s: Settings, admin: AdminClient, job_id: str | None) -> dict[str, Any]:
    """A status snapshot, with the followed job (the one given, else the running one) as ``job``."""
    snap = snapshot(s, admin)
    job = snap["running"]
    if job_id and (job is None or not job["job_id"].startswith(job_id)):
        job = admin.status(job_id)
        history = job.pop("history", [])
        job["rounds_done"], job["recent_rounds"] = len(history), history[-5:]
    snap["job"] = job
    return snap


def _site_queue(snap: dict[str, Any], site: str) -> dict[str, Any] | None:
    name = f"{snap['prefix']}.site.{site}"
    return next((q for q in snap["queues"] if q["name"] == name), None)


def _round_state(site: str, p: dict[str, Any]) -> str:
    if site in p["accepted"]:
        return "accepted"
    if site in p["rejected"]:
        return "rejected"
    if site in p["pending"]:
        return "training"
    return ""


def line(snap: dict[str, Any]) -> str:
    """One line of the view, for line output (no clock in it: a line is printed when it changes)."""
    job = snap.get("job")
    sites = snap["sites"]
    parts = []
    if job is not None:
        text = job_headline(job)
        p = round_progress(job)
        if job["status"] not in ENDED and p["targets"]:
            text += f": {len(p['accepted'])}/{len(p['targets'])} accepted"
            if p["pending"]:
                text += f", pending {', '.join(p['pending'])}"
            t = large_transfer(job)
            if t is not None:
                text += f", task {size(t['received_bytes'])} of {size(t['total_bytes'])} received"
        if job.get("waiting_for") and job.get("phase") != "training":
            text += f"; waits for {_steady(job['waiting_for'])}"
        text += f"; {job['rounds_done']} round(s) done"
        parts.append(text)
    else:
        parts.append("no running job")
    if snap["server"]:
        parts.append(f"sites {sum(1 for x in sites if x['alive'])}/{len(sites)} alive")
    else:
        parts.append(snap["server_error"])
    waiting = sum(q["messages"] for q in snap["queues"])
    parts.append(f"{len(snap['queues'])} queues, {waiting} message(s) waiting, {snap['dead_letters']} dead")
    return " | ".join(parts)


def _steady(text: str) -> str:
    import re

    return re.sub(r" \(for \d+ s\)", "", text)


def rich_view(snap: dict[str, Any], interval: float) -> RenderableType:
    """The terminal view: header, the job and its round, the sites, the queues."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = [Text.assemble(("sagmq watch", "bold"), f"  prefix {snap['prefix']} at {snap['broker']}  ",
                                      (time.strftime("%H:%M:%S"), "dim"), f"  (every {interval:g} s; Ctrl-C quits)")]
    job = snap.get("job")
    p = round_progress(job) if job else {"targets": [], "accepted": [], "rejected": [], "pending": []}
    if job is None:
        parts.append(Text("no running job" if snap["server"] else snap["server_error"], style="yellow"))
    else:
        style = {"finished": "green", "failed": "red", "aborted": "red"}.get(job["status"], "cyan")
        parts.append(Text(job_headline(job), style=f"bold {style}"))
        if job.get("waiting_for"):
            parts.append(Text(f"  waits for: {job['waiting_for']}"))
        if job.get("reason"):
            parts.append(Text(f"  reason: {job['reason']}", style="red"))
        if p["targets"] and job["status"] not in ENDED:
            done = len(p["accepted"]) + len(p["rejected"])
            bar = Table.grid(padding=(0, 1))
            bar.add_row(Text(f"  round {p['round']}"), ProgressBar(total=len(p["targets"]), completed=done, width=40),
                        Text(f"{len(p['accepted'])} of {len(p['targets'])} accepted, {len(p['rejected'])} rejected, "
                             f"{len(p['pending'])} pending"))
            parts.append(bar)
            t = large_transfer(job)
            if t is not None:  # a large model: how much of the task the sites have
                moved = Table.grid(padding=(0, 1))
                moved.add_row(Text("  task    "), ProgressBar(total=max(1, int(t["total_bytes"])),
                                                            completed=int(t["received_bytes"]), width=40),
                              Text(format_transfer(t).split(": ", 1)[-1]))
                parts.append(moved)
        rounds = Table(title=f"last rounds ({job['rounds_done']} done)", title_justify="left", expand=False)
        rounds.add_column("round")
        rounds.add_column("result")
        for h in job.get("recent_rounds", []):
            rounds.add_row(str(h["round"]), format_round(h).split(": ", 1)[-1])
        parts.append(rounds)
    parts.append(_sites_table(snap, p))
    parts.append(_queues_table(snap))
    return Group(*parts)


def _sites_table(snap: dict[str, Any], p: dict[str, Any]) -> Any:
    from rich.table import Table

    alive = sum(1 for x in snap["sites"] if x["alive"])
    t = Table(title=f"sites ({alive} of {len(snap['sites'])} alive)", title_justify="left")
    for col in ("site", "alive", "last seen", "host", "running", "this round", "queue"):
        t.add_column(col)
    for x in snap["sites"]:
        q = _site_queue(snap, x["site"])
        held = "-" if q is None else f"{q['messages']} msg" + (f", {size(q['bytes'])}" if q["bytes"] else "")
        state = _round_state(x["site"], p)
        colour = {"accepted": "green", "rejected": "red", "training": "yellow"}.get(state, "")
        t.add_row(x["site"], "yes" if x["alive"] else "[red]NO[/red]", age(x.get("seen_s_ago")) + " ago",
                  x.get("host", ""), site_doing(x), f"[{colour}]{state}[/{colour}]" if colour else state, held)
    return t


def _queues_table(snap: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title=f"queues ({len(snap['queues'])}); dead letters: {snap['dead_letters']}", title_justify="left",
              caption=f"from {snap['queues_from']}", caption_justify="left")
    for col in ("queue", "messages", "ready", "unacked", "consumers", "bytes", "in/s", "out/s"):
        t.add_column(col, justify="left" if col == "queue" else "right")
    for row in queue_rows(snap["queues"]):
        t.add_row(*row)
    return t


def _outcome(snap: dict[str, Any], job_id: str | None) -> int | None:
    """The exit code once the followed job ended, else None."""
    job = snap.get("job")
    if job_id is None or job is None or job["status"] not in ENDED:
        return None
    return 0 if job["status"] == FINISHED else EXIT_FAILED


def run_watch(s: Settings, job_id: str | None, interval: float, lines: bool) -> int:
    """Redraw (terminal) or print changes (otherwise) until Ctrl-C, or until the followed job ends."""
    from sagmq.cli.admin import CLI_CONNECT_S, AdminClient

    admin = AdminClient(s, CLI_CONNECT_S)
    try:
        if lines or not sys.stdout.isatty():
            return _watch_lines(s, admin, job_id, interval)
        return _watch_live(s, admin, job_id, interval)
    except KeyboardInterrupt:
        return 0
    finally:
        admin.close()


def _watch_lines(s: Settings, admin: AdminClient, job_id: str | None, interval: float) -> int:
    last, told = "", set()
    while True:
        snap = view(s, admin, job_id)
        job = snap.get("job") or {}
        for h in job.get("recent_rounds", []):  # each finished round once, as `sagmq wait` prints it
            if (job["job_id"], h["round"]) not in told:
                told.add((job["job_id"], h["round"]))
                print(f"{time.strftime('%H:%M:%S')} {format_round(h)}", flush=True)
        text = line(snap)
        if text != last:
            print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)
            last = text
        code = _outcome(snap, job_id)
        if code is not None:
            return code
        time.sleep(interval)


def _watch_live(s: Settings, admin: AdminClient, job_id: str | None, interval: float) -> int:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    snap = view(s, admin, job_id)
    # redrawn once per snapshot, not on a timer: a terminal (or a slow SSH link) gets one frame per interval
    with Live(rich_view(snap, interval), console=console, auto_refresh=False, screen=False) as live:
        while True:
            code = _outcome(snap, job_id)
            if code is not None:
                return code
            time.sleep(interval)
            snap = view(s, admin, job_id)
            live.update(rich_view(snap, interval), refresh=True)
