"""`sagmq dead list` / `sagmq dead show ID`: what was dead-lettered, and why."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sagmq.amqp import AmqpBus
from sagmq.wire.bus import Delivery
from sagmq.wire.codec import unpack
from sagmq.wire.errors import DecodeError, SagmqError
from sagmq.wire.settings import Settings
from sagmq.wire.topology import service_topology


def _entries(s: Settings, limit: int) -> list[Delivery]:
    bus = AmqpBus(s, "admin", connect_timeout_s=5).connect()
    try:
        bus.declare(service_topology(s.prefix))
        return bus.browse(bus.names.dead_queue, limit)
    finally:
        bus.close()


def _h(d: Delivery, key: str) -> str:
    return d.header_str(key)


def _when(d: Delivery) -> str:
    raw = d.headers.get("x-sagmq-dead-at")
    if isinstance(raw, int):
        return dt.datetime.fromtimestamp(raw / 1000).strftime("%Y-%m-%d %H:%M:%S")
    return "-"


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


def dead_list(s: Settings, limit: int) -> int:
    """Print one line per dead-lettered message."""
    entries = _entries(s, limit)
    if not entries:
        print(f"no dead-lettered messages in {s.prefix}.dead")
        return 0
    print(f"{'ID':32}  {'WHEN':19}  {'TYPE':16} {'QUEUE':28} {'JOB':10} {'RND':3} {'SITE':10} REASON")
    for d in entries:
        print(f"{d.message_id or '-':32}  {_when(d):19}  {_h(d, 'x-sagmq-original-type') or '-':16} "
              f"{_h(d, 'x-sagmq-queue'):28} {_h(d, 'job_id')[:10] or '-':10} {_h(d, 'round') or '-':3} "
              f"{_h(d, 'site') or '-':10} {_h(d, 'x-sagmq-reason') or '(no reason: dead-lettered by the broker)'}")
    print(f"{len(entries)} message(s)")
    return 0


def dead_show(s: Settings, ident: str, limit: int) -> int:
    """Print one dead-lettered message: headers, reason and a summary of its body."""
    for d in _entries(s, limit):
        if ident in (d.message_id, _h(d, "x-sagmq-original-message-id")) or (
                len(ident) >= 6 and (d.message_id or "").startswith(ident)):
            try:
                body: Any = _summary(unpack(d.body, len(d.body) + 1))
            except DecodeError as e:
                body = f"<not msgpack ({e}); first bytes {d.body[:64]!r}>"
            headers = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in d.headers.items()}
            print(json.dumps({"id": d.message_id, "reason": _h(d, "x-sagmq-reason"), "when": _when(d),
                              "published_by": d.user_id, "headers": headers, "body": body},
                             indent=2, default=str))
            return 0
    raise SagmqError(f"no dead-lettered message with id {ident!r}")
