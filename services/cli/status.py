"""`sagmq status`: one view of a deployment: its sites, the running job, the job queue and its queues.

The server answers for the sites and the jobs (an admin request). The queues come from the broker:
its management HTTP API where it is enabled and the user may read it (depth, consumers, bytes and
message rates of every queue of the prefix), else a passive declare of each queue sagmq knows of
(depth and consumers only). `snapshot()` gathers one dict, which `--json` prints as it is and
`render()` turns into the human view; `sagmq watch` draws the same dict every second.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any

from sagmq.wire.errors import SagmqError
from sagmq.wire.settings import Settings
from sagmq.wire.topology import Names, service_topology

if TYPE_CHECKING:  # importing it would load the broker client
    from sagmq.cli.admin import AdminClient

HTTP_TIMEOUT_S = 3.0


# --- the broker's view of the queues --------------------------------------------------------------


def management_url(s: Settings) -> str:
    """The management API's base URL: SAGMQ_MANAGEMENT_URL, else port 15672 of the AMQP host."""
    if s.management_url:
        return s.management_url.rstrip("/")
    u = urllib.parse.urlparse(s.amqp_url.split(",")[0])
    scheme = "https" if u.scheme == "amqps" else "http"
    return f"{scheme}://{u.hostname or 'localhost'}:{15671 if scheme == 'https' else 15672}"


def credentials(s: Settings) -> tuple[str, str, str]:
    """User, password and vhost of the (first) AMQP URL."""
    u = urllib.parse.urlparse(s.amqp_url.split(",")[0])
    vhost = urllib.parse.unquote(u.path[1:]) if len(u.path) > 1 else "/"
    return urllib.parse.unquote(u.username or "guest"), urllib.parse.unquote(u.password or "guest"), vhost


def management_get(s: Settings, path: str) -> Any:
    """GET one management API path as JSON, with the AMQP URL's credentials (raises OSError, ValueError)."""
    user, password, _ = credentials(s)
    req = urllib.request.Request(f"{management_url(s)}/api/{path}")
    req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
        return json.loads(r.read())


def management_list(s: Settings, kind: str, columns: str) -> list[dict[str, Any]]:
    """Every queue or exchange of the prefix (kind: queues, exchanges), filtered by the broker: a broker
    shared by many deployments may hold thousands of queues."""
    _, _, vhost = credentials(s)
    name = urllib.parse.quote("^" + re.escape(f"{s.prefix}."), safe="")
    out: list[dict[str, Any]] = []
    page, pages = 1, 1
    while page <= pages:
        r = management_get(s, f"{kind}/{urllib.parse.quote(vhost, safe='')}?page={page}&page_size=500"
                              f"&name={name}&use_regex=true&columns={columns}")
        out += r["items"]
        pages, page = int(r["page_count"]), page + 1
    return out


def _rate(stats: dict[str, Any], key: str) -> float:
    return float((stats.get(f"{key}_details") or {}).get("rate", 0.0))


def queues_from_management(s: Settings) -> tuple[list[dict[str, Any]] | None, str]:
    """Every queue of the prefix from the management API, or None and why it could not be read."""
    cols = "name,messages,messages_ready,messages_unacknowledged,consumers,message_bytes,message_stats"
    try:
        rows = management_list(s, "queues", cols)
    except urllib.error.HTTPError as e:
        why = "the user may not read it (give it the monitoring tag)" if e.code in (401, 403) else f"HTTP {e.code}"
        return None, f"management API {management_url(s)}: {why}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = getattr(e, "reason", e)
        return None, f"management API {management_url(s)} not reachable ({reason})"
    out = []
    for q in rows:
        if not str(q.get("name", "")).startswith(f"{s.prefix}."):
            continue
        stats = q.get("message_stats") or {}
        out.append({"name": q["name"], "messages": int(q.get("messages") or 0),
                    "ready": int(q.get("messages_ready") or 0), "unacked": int(q.get("messages_unacknowledged") or 0),
                    "consumers": int(q.get("consumers") or 0), "bytes": int(q.get("message_bytes") or 0),
                    "publish_rate": _rate(stats, "publish"), "deliver_rate": _rate(stats, "deliver_get"),
                    "ack_rate": _rate(stats, "ack")})
    return sorted(out, key=lambda q: q["name"]), f"management API {management_url(s)}"


def known_queues(prefix: str, sites: list[str]) -> list[str]:
    """The queues sagmq declares for a prefix and these sites."""
    names = Names(prefix)
    return [q.name for q in service_topology(prefix).queues] + [names.site_queue(x) for x in sites]


def queues_from_amqp(admin: AdminClient, names: list[str]) -> list[dict[str, Any]]:
    """Depth and consumers of each queue that exists, from passive declares (no rates over AMQP)."""
    out = []
    for name in names:
        depth = admin.queue_depth(name)
        if depth is None:
            continue
        messages, consumers = depth
        out.append({"name": name, "messages": messages, "ready": messages, "unacked": None, "consumers": consumers,
                    "bytes": None, "publish_rate": None, "deliver_rate": None, "ack_rate": None})
    return sorted(out, key=lambda q: q["name"])


RESOURCE_LOCKED = 405  # a passive declare of another connection's exclusive queue


def is_claim(prefix: str, queue: str) -> bool:
    """A site's name claim (P.claim.<site>): an exclusive queue of the site's connection (sagmq.amqp.claim)."""
    return queue.startswith(f"{prefix}.claim.")


def live_counts(admin: AdminClient, q: dict[str, Any]) -> dict[str, Any] | None:
    """A management API row with its ready messages and consumers as the queue has them now (a passive
    declare): the API's figures are up to its statistics interval (5 s) old, which shows a service that
    just started as no consumer. None if the queue is gone. A site's name claim is exclusive to the site's
    connection, so it is not declared (the broker would refuse: 405 RESOURCE_LOCKED) but shown as the API
    has it, marked as a claim; so is any other queue the broker will not let us declare."""
    if is_claim(admin.s.prefix, q["name"]):
        return {**q, "claim": True}
    try:
        depth = admin.queue_depth(q["name"])
    except Exception as e:  # pika's ChannelClosedByBroker (only the bus may import pika); the next declare
        if getattr(e, "reply_code", None) != RESOURCE_LOCKED:  # gets a fresh channel (AmqpBus.channel)
            raise
        return dict(q)
    if depth is None:
        return None
    ready, consumers = depth
    return {**q, "ready": ready, "consumers": consumers, "messages": ready + int(q["unacked"] or 0)}


# --- the server's view of sites and jobs ----------------------------------------------------------


def _server(admin: AdminClient) -> tuple[dict[str, Any] | None, str]:
    """The server's status, or None and why (no server consumes its admin queue, or it did not answer)."""
    queue = admin.bus.names.server_admin_queue
    if admin.consumers(queue) == 0:
        return None, f"no server: nobody consumes {queue} (is `sagmq server` running with SAGMQ_PREFIX={admin.s.prefix}?)"
    try:
        return admin.status(), ""
    except SagmqError as e:
        return None, f"the server did not answer: {e}"


def _job(admin: AdminClient, job_id: str) -> dict[str, Any]:
    """A job's status, trimmed to what the views show (its last rounds, not the whole history)."""
    st = admin.status(job_id)
    history = st.pop("history", [])
    st["rounds_done"] = len(history)
    st["recent_rounds"] = history[-5:]
    return st


def snapshot(s: Settings, admin: AdminClient) -> dict[str, Any]:
    """Everything `sagmq status` shows, as one JSON-ready dict."""
    from sagmq.amqp.connection import safe_url

    server, server_error = _server(admin)
    sites = server["sites"] if server else []
    running = _job(admin, server["running"]) if server and server.get("running") else None
    queued: list[dict[str, Any]] = []
    if server and server.get("queued"):
        jobs = {j["job_id"]: j for j in admin.call("list").result["jobs"]}
        queued = [jobs[j] for j in server["queued"] if j in jobs]
    queues, source = queues_from_management(s)
    if queues is None:
        site_names = [x["site"] for x in sites]
        queues, source = queues_from_amqp(admin, known_queues(s.prefix, site_names)), f"passive declares ({source})"
    else:
        queues = [q for q in (live_counts(admin, q) for q in queues) if q is not None]
        source += " and passive declares"
    dead = next((q["messages"] for q in queues if q["name"] == f"{s.prefix}.dead"), 0)
    return {"taken_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "prefix": s.prefix,
            "broker": safe_url(s.amqp_url), "server": server is not None, "server_error": server_error,
            "sites": sites, "running": running, "queued": queued, "queues": queues, "queues_from": source,
            "dead_letters": dead}


# --- the human view -------------------------------------------------------------------------------


def age(seconds: float | None) -> str:
    """0.4 s, 12 s, 3 min 5 s, 2.5 h, 4.0 d."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{seconds / 3600:.1f} h" if seconds < 86400 else f"{seconds / 86400:.1f} d"


def size(n: int | None) -> str:
    """Bytes in B, KB, MB, GB."""
    if n is None:
        return "-"
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def site_doing(site: dict[str, Any]) -> str:
    """What a site runs, in words."""
    if not site.get("busy_job"):
        return "idle"
    rnd = site.get("busy_round", -1)
    return f"job {site['busy_job'][:8]}" + (f" round {rnd}" if isinstance(rnd, int) and rnd >= 0 else "")


def round_progress(job: dict[str, Any]) -> dict[str, Any]:
    """The open round: its number, targets, and who answered (accepted, rejected, pending)."""
    rec = job.get("open_round") or {}
    targets = list(rec.get("targets") or [])
    accepted = list(rec.get("accepted") or [])
    rejected = [r.get("site", "") for r in rec.get("rejected") or []]
    pending = [t for t in targets if t not in accepted and t not in rejected]
    return {"round": rec.get("round", job.get("current_round")), "targets": targets, "accepted": accepted,
            "rejected": rejected, "pending": pending}


def job_headline(job: dict[str, Any]) -> str:
    """`job 1a2b3c4d (hello-numpy-sag) running: round 1 (0..2), phase training`."""
    text = f"job {job['job_id'][:8]} ({job['name']}) {job['status']}"
    if job["status"] in ("finished", "failed", "aborted"):
        done = job["rounds_done"] if "rounds_done" in job else len(job.get("history", []))
        return f"{text} after {done} round(s)"
    if job.get("current_round") is not None:
        text += f": round {job['current_round']}"
        if "last_round" in job:
            text += f" ({job['first_round']}..{job['last_round']})"
    if job.get("phase"):
        text += f", phase {job['phase']}"
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]


def _rate_text(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def queue_rows(queues: list[dict[str, Any]]) -> list[list[str]]:
    """The queue table's rows: name (a site's name claim marked so), messages, ready, unacked, consumers,
    bytes, in/s, out/s."""
    return [[q["name"] + (" (site name claim)" if q.get("claim") else ""), str(q["messages"]), str(q["ready"]), "-" if q["unacked"] is None else str(q["unacked"]),
             str(q["consumers"]), size(q["bytes"]), _rate_text(q["publish_rate"]), _rate_text(q["deliver_rate"])]
            for q in queues]


QUEUE_HEADER = ["QUEUE", "MESSAGES", "READY", "UNACKED", "CONSUMERS", "BYTES", "IN/S", "OUT/S"]


def render(snap: dict[str, Any]) -> str:
    """The human view of a snapshot."""
    lines = [f"sagmq status: prefix {snap['prefix']} at {snap['broker']} ({snap['taken_at']})", ""]
    sites = snap["sites"]
    if not snap["server"]:
        lines += [f"SERVER  {snap['server_error']}", ""]
    else:
        alive = sum(1 for x in sites if x["alive"])
        lines.append(f"SITES  {alive} of {len(sites)} alive")
        rows = [[x["site"], "yes" if x["alive"] else "NO", age(x.get("seen_s_ago")) + " ago", x.get("host", ""),
                 site_doing(x)] for x in sites]
        lines += _table(["SITE", "ALIVE", "LAST SEEN", "HOST", "RUNNING"], rows) if rows else ["  (no site connected)"]
        lines.append("")
        lines += _job_lines(snap["running"])
        queued = snap["queued"]
        lines.append(f"QUEUED JOBS  {len(queued)}")
        lines += [f"  {j['job_id'][:8]}  {j['name']}  submitted {age(time.time() - j['submitted_at'])} ago"
                  for j in queued]
        lines.append("")
    lines.append(f"QUEUES  {len(snap['queues'])} (from {snap['queues_from']})")
    lines += _table(QUEUE_HEADER, queue_rows(snap["queues"]))
    lines.append(f"dead letters: {snap['dead_letters']} in {snap['prefix']}.dead"
                 + (" (`sagmq dead list` shows them)" if snap["dead_letters"] else ""))
    return "\n".join(lines)


def _job_lines(job: dict[str, Any] | None) -> list[str]:
    if job is None:
        return ["RUNNING JOB  none", ""]
    lines = [f"RUNNING JOB  {job_headline(job).removeprefix('job ')}"]
    if job.get("waiting_for"):
        lines.append(f"  waits for: {job['waiting_for']}")
    p = round_progress(job)
    if p["targets"]:
        lines.append(f"  round {p['round']}: accepted {len(p['accepted'])} of {len(p['targets'])} expected"
                     + (f" ({', '.join(p['accepted'])})" if p["accepted"] else "")
                     + (f"; rejected {', '.join(p['rejected'])}" if p["rejected"] else "")
                     + (f"; pending {', '.join(p['pending'])}" if p["pending"] else ""))
    from sagmq.cli.jobs import format_transfer, large_transfer

    t = large_transfer(job)
    if t is not None:
        lines.append(f"  transfer: {format_transfer(t)}")
    lines.append(f"  rounds done: {job['rounds_done']}")
    return [*lines, ""]


def run_status(s: Settings, job_id: str | None, as_json: bool) -> int:
    """`sagmq status [JOB] [--json]`."""
    from sagmq.cli.admin import CLI_CONNECT_S, AdminClient

    admin = AdminClient(s, CLI_CONNECT_S)
    try:
        if job_id:
            st = admin.status(job_id)
            print(json.dumps(st, default=str) if as_json else render_job(st))
            return 0
        snap = snapshot(s, admin)
    finally:
        admin.close()
    print(json.dumps(snap, default=str) if as_json else render(snap))
    return 0


def render_job(st: dict[str, Any]) -> str:
    """One job's human view: its headline, what it waits for, and a line per round."""
    from sagmq.cli.jobs import format_round

    lines = [job_headline(st)]
    if st.get("reason"):
        lines.append(f"  reason: {st['reason']}")
    if st.get("waiting_for"):
        lines.append(f"  waits for: {st['waiting_for']}")
    lines += ["  " + format_round(h) for h in st.get("history", [])]
    if st.get("cross_site_eval"):
        lines += cross_site_lines(st["cross_site_eval"])
    return "\n".join(lines)


def cross_site_lines(cse: dict[str, Any]) -> list[str]:
    """A job's cross-site evaluation: its phase, participants and models, who still owes results, the
    results matrix (one line per data site: each model's metrics) and the failures."""
    lines = [f"  cross-site evaluation: {cse.get('phase', '?')}"
             + (f" (for {age(cse['for_s'])})" if isinstance(cse.get("for_s"), int | float) else "")]
    lines.append(f"    participants: {', '.join(cse.get('participants') or []) or '-'}"
                 + (f"; missing {', '.join(cse['missing'])}" if cse.get("missing") else ""))
    lines.append(f"    models: {', '.join(cse.get('models') or []) or '-'}")
    for owner, sites in sorted((cse.get("waiting_for") or {}).items()):
        lines.append(f"    waits for {', '.join(sites)} to validate {owner}")
    for site, by_model in sorted((cse.get("results") or {}).items()):
        cells = [f"{model} " + ", ".join(f"{k}={_num(v)}" for k, v in sorted(m.items()))
                 if isinstance(m, dict) else f"{model} {m}" for model, m in sorted(by_model.items())]
        lines.append(f"    {site}: {'; '.join(cells)}")
    lines += [f"    failed: {f.get('site', '?')} on {f.get('model_owner', '?')}: {f.get('reason', '')}"
              for f in cse.get("failures") or []]
    return lines


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
