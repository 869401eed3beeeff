"""Consuming: deliveries queued by pika's callback, then handed to handlers at top level, acked,
requeued or dead-lettered; blobs reassembled first unless the consumer streams them.

What a handler's failure does (the Bus contract):

- ``DecodeError`` / ``Rejected``: the message is dead-lettered with that reason;
- ``BrokerRefused`` (the broker closed the channel over something the handler did): the bus has
  reconnected already, so the message comes back, and is dead-lettered then (no loop);
- anything else is a bug in the handler, even an ``AssertionError`` or a pika error of its own:
  the message is dead-lettered once with ``internal error: <Type>: <msg>``. Only when the bus's
  own connection or channel is gone does the error propagate, for the bus to reconnect.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sagmq.runtime.metrics import Meter
from sagmq.wire.blob import Reassembler, Step, is_part
from sagmq.wire.bus import Delivery, Handler, Settle, run_handler
from sagmq.wire.settings import Settings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Consumer:
    """A queue consumed, now and after every reconnect."""

    queue: str
    handler: Handler
    prefetch: int
    stream: bool = False  # hand blob parts to the handler one by one instead of assembling


def to_delivery(queue: str, method: Any, props: Any, body: bytes, generation: int) -> Delivery:
    """A pika delivery (or Basic.GetOk) as a sagmq Delivery."""
    return Delivery(
        queue=queue,
        exchange=method.exchange,
        routing_key=method.routing_key,
        msg_type=props.type or "",
        headers=dict(props.headers or {}),
        user_id=props.user_id,
        message_id=props.message_id,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        redelivered=bool(method.redelivered),
        body=body,
        tag=method.delivery_tag,
        generation=generation,
    )


class Consuming:
    """The consumers of a bus, the deliveries waiting for their handlers, and the blobs in assembly."""

    def __init__(self, settings: Settings, bus: Settle, meter: Meter | None = None) -> None:
        self.meter = meter  # counts every delivery (runtime.metrics)
        self.consumers: list[Consumer] = []
        self.inbox: deque[tuple[Consumer, Delivery]] = deque()
        self.blobs: Reassembler[Delivery] = Reassembler(settings.max_model_bytes, settings.max_body_bytes,
                                                        settings.chunk_timeout_s)
        self._bus = bus
        self._poison: dict[str, str] = {}  # message ids whose handling the broker refused

    def on_message(self, c: Consumer, generation: Callable[[], int]) -> Callable[[Any, Any, Any, bytes], None]:
        """The pika callback of consumer c: it only queues the delivery."""

        count = self.meter.count_received if self.meter is not None else None

        def record(_ch: Any, method: Any, props: Any, body: bytes) -> None:
            self.inbox.append((c, to_delivery(c.queue, method, props, body, generation())))
            if count is not None:
                count(props.type, len(body))

        return record

    def reset(self) -> None:
        """After a lost connection: what was queued or half assembled is redelivered anyway."""
        self.inbox.clear()
        self.blobs.clear()

    def dispatch(self) -> None:
        """Hand every queued delivery to its handler, in order."""
        while self.inbox:
            c, d = self.inbox.popleft()
            whole = self._assemble(c, d) if is_part(d.headers) and not c.stream else d
            if whole is not None:
                self._handle(c, whole)

    def _handle(self, c: Consumer, d: Delivery) -> None:
        # a BrokerRefused replaced its channel: the message comes back, and is dead-lettered then
        run_handler(c.handler, d, self._poison, self._bus)

    def _assemble(self, c: Consumer, d: Delivery) -> Delivery | None:
        """Add a blob part; the whole message once every part is in."""
        step = self.blobs.add(c.queue, d.headers, d.body, d)
        if step.kind == "pending":
            if step.copied:
                d.body = b""  # copied into the assembly: hold only the delivery tag
            return None
        if step.kind != "done":
            self.settle_refused(step)
            return None
        first, held = step.first, step.held
        assert first is not None  # a done step names its part 0
        return Delivery(first.queue, first.exchange, first.routing_key, first.msg_type, first.headers,
                        first.user_id, first.message_id, first.correlation_id, first.reply_to,
                        any(p.redelivered for p in held), first.body, first.tag, first.generation,
                        payload=step.message, parts=held)

    def settle_refused(self, step: Step[Delivery]) -> None:
        """A refused blob: its first part is dead-lettered with the reason, the rest acked."""
        if step.kind == "refused" and step.first is not None:
            self._bus.dead_letter(step.first, step.reason)
        for p in step.rest if step.kind == "refused" else step.held:
            self._bus.ack(p)

    def expire(self) -> None:
        """Dead-letter blobs whose missing parts did not come in time."""
        for step in self.blobs.expire():
            self.settle_refused(step)
