"""`sagmq dead list` / `sagmq dead show ID` / `sagmq dead purge`: what was dead-lettered, and why.

Two kinds of message end in P.dead: copies a service made of a message it could not process
(their reason in ``x-sagmq-reason``, their queue in ``x-sagmq-queue``), and messages the broker
dead-lettered itself (rejected when a service could not copy them, or expired, or dropped from a
full queue), which carry RabbitMQ's ``x-death`` records instead. The list reads both. P.dead is
bounded (``SAGMQ_DEAD_MAX_LENGTH``, ``SAGMQ_DEAD_TTL_S``), and the list says when it shows only
part of it. These commands declare nothing: a read-only look must work with any queue arguments.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sagmq.amqp import AmqpBus
from sagmq.wire.bus import Delivery
from sagmq.wire.codec import unpack
from sagmq.wire.errors import DecodeError, SagmqError
from sagmq.wire.settings import Settings

NOT_FOUND = 404


@contextmanager
def _bus(s: Settings) -> Iterator[AmqpBus]:
    bus = AmqpBus(s, "admin", connect_timeout_s=2.5).connect()  # a CLI fails within 5 s without a broker
    try:
        yield bus
    finally:
        bus.close()


def _depth(bus: AmqpBus) -> int | None:
    """How many messages P.dead holds (a passive declare), or None when no service declared it yet."""
    try:
        return int(bus.channel.queue_declare(bus.names.dead_queue, passive=True).method.message_count)
    except Exception as e:  # pika's ChannelClosedByBroker; only the bus may import pika
        if getattr(e, "reply_code", None) == NOT_FOUND:
            return None
        raise


def _entries(s: Settings, limit: int) -> tuple[list[Delivery], int | None]:
    """Up to limit dead letters (left in place), and how many there are."""
    with _bus(s) as bus:
        depth = _depth(bus)
        if depth is None:
            return [], None
        return bus.browse(bus.names.dead_queue, limit), depth


def _h(d: Delivery, key: str) -> str:
    return d.header_str(key)


def _text(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else ("" if v is None else str(v))


def death(d: Delivery) -> dict[str, Any]:
    """The broker's latest x-death record of a message it dead-lettered itself ({} for sagmq's copies)."""
    records = d.headers.get("x-death")
    if isinstance(records, list) and records and isinstance(records[0], dict):
        return records[0]
    return {}


def _when(d: Delivery) -> str:
    raw = d.headers.get("x-sagmq-dead-at")
    if isinstance(raw, int):
        return dt.datetime.fromtimestamp(raw / 1000).strftime("%Y-%m-%d %H:%M:%S")
    at = death(d).get("time")
    if isinstance(at, dt.datetime):
        return at.strftime("%Y-%m-%d %H:%M:%S")
    return "-"


def reason(d: Delivery) -> str:
    """Why it is dead: sagmq's reason, else the broker's (expired, rejected, maxlen)."""
    if _h(d, "x-sagmq-reason"):
        return _h(d, "x-sagmq-reason")
    why = _text(death(d).get("reason"))
    return f"{why} (dead-lettered by the broker)" if why else "(no reason recorded)"


def source_queue(d: Delivery) -> str:
    """The queue it was dead-lettered from."""
    return _h(d, "x-sagmq-queue") or _text(death(d).get("queue")) or "-"


def _type(d: Delivery) -> str:
    return _h(d, "x-sagmq-original-type") or ("" if d.msg_type == "dead" else d.msg_type) or "-"


def list_lines(entries: list[Delivery], depth: int, queue: str) -> list[str]:
    """The lines `sagmq dead list` prints: a header, one line per message, and how many of how many."""
    if not entries:
        return [f"no dead-lettered messages in {queue}"]
    lines = [f"{'ID':32}  {'WHEN':19}  {'TYPE':16} {'QUEUE':28} {'JOB':10} {'RND':3} {'SITE':10} REASON"]
    for d in entries:
        lines.append(f"{d.message_id or '-':32}  {_when(d):19}  {_type(d):16} {source_queue(d):28} "
                     f"{_h(d, 'job_id')[:10] or '-':10} {_h(d, 'round') or '-':3} {_h(d, 'site') or '-':10} "
                     f"{reason(d)}")
    total = max(depth, len(entries))  # more may have come since the count was taken
    if total > len(entries):
        lines.append(f"showing {len(entries)} of {total} message(s): `--limit N` reads more, "
                     f"`sagmq dead purge` empties {queue}")
    else:
        lines.append(f"{len(entries)} message(s)")
    return lines


def entry_dict(d: Delivery) -> dict[str, Any]:
    """One dead letter as `dead list --json` gives it."""
    return {"id": d.message_id or "", "when": _when(d), "type": _type(d), "queue": source_queue(d),
            "job_id": _h(d, "job_id"), "round": _h(d, "round"), "site": _h(d, "site"), "reason": reason(d)}


def dead_list(s: Settings, limit: int, as_json: bool = False) -> int:
    """Print one line per dead-lettered message (up to limit), and how many there are in all."""
    entries, depth = _entries(s, limit)
    queue = f"{s.prefix}.dead"
    if as_json:
        print(json.dumps({"queue": queue, "exists": depth is not None, "total": max(depth or 0, len(entries)),
                          "shown": len(entries), "messages": [entry_dict(d) for d in entries]}))
        return 0
    if depth is None:
        print(f"no dead-letter queue {queue} (no service has declared it yet)")
        return 0
    print("\n".join(list_lines(entries, depth, queue)))
    return 0


def dead_purge(s: Settings) -> int:
    """Empty the dead-letter queue; print how many messages it held."""
    with _bus(s) as bus:
        if _depth(bus) is None:
            print(f"no dead-letter queue {bus.names.dead_queue} (no service has declared it yet)")
            return 0
        purged = int(bus.channel.queue_purge(bus.names.dead_queue).method.message_count)
        print(f"purged {purged} message(s) from {bus.names.dead_queue}")
    return 0


def _summary(value: Any, depth: int = 0) -> Any:
    """A printable view of a decoded body: arrays as dtype/shape, long binaries as their size."""
    if isinstance(value, dict):
        if set(value) == {"dtype", "shape", "data"} and isinstance(value["data"], bytes):
            return f"<ndarray {value['dtype']} {value['shape']}, {len(value['data'])} bytes>"
        return {k: _summary(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_summary(v, depth + 1) for v in value[:20]] + (["…"] if len(value) > 20 else [])
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return value


def dead_show(s: Settings, ident: str, limit: int) -> int:
    """Print one dead-lettered message: headers, reason and a summary of its body."""
    for d in _entries(s, limit)[0]:
        if ident in (d.message_id, _h(d, "x-sagmq-original-message-id")) or (
                len(ident) >= 6 and (d.message_id or "").startswith(ident)):
            try:
                body: Any = _summary(unpack(d.body, len(d.body) + 1))
            except DecodeError as e:
                body = f"<not msgpack ({e}); first bytes {d.body[:64]!r}>"
            headers = {k: _headers(v) for k, v in d.headers.items()}
            print(json.dumps({"id": d.message_id, "reason": reason(d), "queue": source_queue(d), "when": _when(d),
                              "published_by": d.user_id, "headers": headers, "body": body},
                             indent=2, default=str))
            return 0
    raise SagmqError(f"no dead-lettered message with id {ident!r}")


def _headers(v: Any) -> Any:
    """A header value for JSON: bytes as text, inside x-death's tables and lists too."""
    if isinstance(v, dict):
        return {k: _headers(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_headers(x) for x in v]
    return _text(v) if isinstance(v, bytes) else v
