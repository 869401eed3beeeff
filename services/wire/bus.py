"""The bus interface every service is written against: what a delivery is and what a bus does.

Two implementations exist: ``sagmq.amqp.AmqpBus`` (RabbitMQ through pika) and
``sagmq.memory.MemoryBus`` (in-process, for broker-free tests of each service's choreography).
Nothing here imports pika.

The contract both keep:

- ``publish`` returns once the message is routed and accepted (confirmed); it raises
  ``SagmqError`` if it is unroutable or refused. ``advisory=True`` publishes transient and
  unconfirmed (heartbeats, verdicts, round control): the receiver copes with loss.
- ``send`` is a confirmed publish that does not wait: ``on_done(None)`` or ``on_done(error)``
  runs on the bus's thread once the broker settled every part. Sends leave in order.
- A consumed message is acked after its handler returns, unless the handler deferred it
  (``Delivery.deferred``, set by ``requeue`` or by the handler to ack later with ``ack``).
- A handler that raises ``DecodeError`` or ``Rejected`` has the message dead-lettered with
  that reason; any other exception from a handler is a bug in the handler: the message is
  dead-lettered once with ``internal error: ...`` and the service keeps going. Only a lost
  connection reconnects (and redelivers unacked messages).
- Large messages travel as blobs of parts; the bus reassembles them before the handler sees
  them, unless the consumer asked for ``stream=True`` (the aggregator adds parts as they come).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from sagmq.wire.blob import H_BLOB
from sagmq.wire.errors import BrokerRefused, DecodeError, Rejected, SagmqError
from sagmq.wire.messages import Message, decode, from_wire
from sagmq.wire.settings import Settings
from sagmq.wire.topology import Names, Topology

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

CONTENT_TYPE = "application/msgpack"


@dataclass(slots=True)
class Delivery:
    """One received message with the properties sagmq uses."""

    queue: str
    exchange: str
    routing_key: str
    msg_type: str
    headers: dict[str, Any]
    user_id: str | None
    message_id: str | None
    correlation_id: str | None
    reply_to: str | None
    redelivered: bool
    body: bytes
    tag: int
    generation: int
    deferred: bool = False
    payload: Any = None  # the assembled message map of a blob
    parts: list[Delivery] = field(default_factory=list)  # a blob's part deliveries

    def message(self, cls: type[M], limit: int) -> M:
        """This delivery as a message of class cls (assembled blobs included)."""
        if self.payload is not None:
            return from_wire(cls, self.payload)
        return decode(cls, self.body, limit)

    def header_str(self, key: str) -> str:
        """A header as a string ('' when absent)."""
        v = self.headers.get(key)
        return v.decode() if isinstance(v, bytes) else ("" if v is None else str(v))


Handler = Callable[[Delivery], None]
Done = Callable[[SagmqError | None], None]


class Bus(Protocol):
    """A connection to the message broker, owned by one thread (see the module docstring)."""

    settings: Settings
    service: str
    names: Names
    dead_lettered: int
    on_reconnect: list[Callable[[], None]]

    def connect(self) -> Bus:
        """Open the connection (retrying while the broker is unreachable); return self."""
        ...

    def close(self, flush_s: float = 10.0) -> None:
        """Close, after up to flush_s seconds for unconfirmed sends; unacked deliveries go back."""
        ...

    def reset(self, why: str) -> None:
        """Drop the connection on purpose once the current callback returns (all unacked come back)."""
        ...

    def declare(self, topo: Topology) -> None:
        """Declare a topology now and after every reconnect."""
        ...

    def delete(self, topo: Topology) -> None:
        """Delete a topology's queues and exchanges (tests and `sagmq poc` clean up with it)."""
        ...

    def publish(
        self,
        exchange: str,
        routing_key: str,
        msg: Message,
        headers: dict[str, Any] | None = None,
        cc: list[str] | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        expiration_s: float | None = None,
        mandatory: bool = True,
        persistent: bool = True,
        advisory: bool = False,
    ) -> None:
        """Publish one message and wait for the broker to take it (see the module docstring)."""
        ...

    def publish_bytes(self, exchange: str, routing_key: str, body: bytes, msg_type: str,
                      headers: dict[str, Any] | None = None, persistent: bool = True) -> None:
        """Publish a prepared body, confirmed and mandatory (the floor benchmark, raw tests)."""
        ...

    def send(
        self,
        exchange: str,
        routing_key: str,
        msg: Message,
        headers: dict[str, Any] | None = None,
        cc: list[str] | None = None,
        expiration_s: float | None = None,
        on_done: Done | None = None,
        retain: bool = True,
        persistent: bool = True,
    ) -> None:
        """Publish confirmed without waiting; on_done runs once the broker settled it. persistent=False
        (delivery mode 1) suits a model the workflow sends again if a broker restart loses it."""
        ...

    @property
    def sending(self) -> int:
        """Sends not yet confirmed (or failed)."""
        ...

    @property
    def generation(self) -> int:
        """Counts connections: deliveries of an older generation can no longer be acked."""
        ...

    def flush_sends(self, timeout_s: float) -> bool:
        """Serve I/O until every send is settled or timeout_s passes; True if none is left."""
        ...

    def reply(self, request: Delivery, msg: Message) -> None:
        """Answer an RPC request on its reply_to with its correlation_id."""
        ...

    def rpc(self, exchange: str, routing_key: str, msg: Message, timeout_s: float) -> Delivery:
        """Send a request and wait for its reply (RpcTimeout after timeout_s)."""
        ...

    def consume(self, queue: str, handler: Handler, prefetch: int = 16, stream: bool = False) -> None:
        """Deliver a queue's messages to handler, now and after every reconnect."""
        ...

    def ack(self, d: Delivery) -> None:
        """Ack a delivery (all its parts); skipped if its connection is gone (it is redelivered)."""
        ...

    def ack_many(self, deliveries: list[Delivery]) -> None:
        """Ack deliveries that were held until their effect was durable."""
        ...

    def requeue(self, d: Delivery) -> None:
        """Give a delivery back to its queue to come again."""
        ...

    def dead_letter(self, d: Delivery, reason: str) -> None:
        """Log the reason, copy the message to the dead-letter exchange with it, ack the original."""
        ...

    def browse(self, queue: str, limit: int = 1000) -> list[Delivery]:
        """Read up to limit messages of a queue without removing them."""
        ...

    def process(self, time_limit: float) -> None:
        """Serve I/O (deliveries, confirms, heartbeats, thread-safe calls) for up to time_limit s."""
        ...

    def run(self, stop: threading.Event, tick: Callable[[], None] | None = None, tick_s: float = 0.1) -> None:
        """Serve until stop is set, calling tick every tick_s seconds."""
        ...

    def call_threadsafe(self, fn: Callable[[], None]) -> None:
        """Run fn on the bus's own thread at its next process() (the only cross-thread call)."""
        ...


# --- the handler contract, kept by every implementation -----------------------------------------


class Settle(Protocol):
    """What running a handler needs of the bus that delivered the message."""

    def ack(self, d: Delivery) -> None:
        """Ack a delivery (all its parts)."""

    def dead_letter(self, d: Delivery, reason: str) -> None:
        """Copy a delivery to the dead-letter queue with the reason, then ack it."""

    def broken(self) -> bool:
        """Whether the bus's own connection or channel is gone (then a handler's error is not its bug)."""


def run_handler(handler: Handler, d: Delivery, poison: dict[str, str], bus: Settle) -> BrokerRefused | None:
    """Run handler on d as the module docstring says: ack after it returns (unless deferred);
    DecodeError / Rejected dead-letter with their reason; any other exception dead-letters once as
    an internal error, unless the bus itself broke under the handler (then it propagates, the bus
    reconnects and the message comes back). A BrokerRefused is returned: the broker closed the
    channel, so the message comes back, and is dead-lettered then (its id is kept in poison)."""
    if d.message_id and d.message_id in poison:
        bus.dead_letter(d, poison.pop(d.message_id))
        return None
    try:
        handler(d)
    except (DecodeError, Rejected) as e:
        bus.dead_letter(d, str(e))
        return None
    except BrokerRefused as e:
        log.error("handling %s message %s: %s", d.msg_type, d.message_id, e)
        if d.message_id:
            poison[d.message_id] = f"handling it made the broker refuse an operation: {e}"
        return e
    except Exception as e:
        if bus.broken():
            raise
        log.exception("handler for %s failed on %s message", d.queue, d.msg_type,
                      extra={"rate_kind": f"handler bug {d.queue} {type(e).__name__}"})
        bus.dead_letter(d, f"internal error: {type(e).__name__}: {e}")
        return None
    if not d.deferred:
        bus.ack(d)
    return None


def dead_letter_headers(d: Delivery, reason: str) -> dict[str, Any]:
    """The headers of a message's copy in the dead-letter queue: its own, and why it is there
    (schemas/README.md lists them). Logs the reason; a flood of junk from one user into one queue
    would write a line per message, so the line names its kind, which the services' log handler
    rate-limits (sagmq.runtime.logs: the first line, then at most one per 10 s with a count)."""
    log.warning("dead-lettering %s message from queue %s (user %s, job %s, round %s, site %s): %s",
                d.msg_type or "untyped", d.queue, d.user_id, d.header_str("job_id"), d.header_str("round"),
                d.header_str("site"), reason, extra={"rate_kind": f"dead-letter {d.queue} {d.user_id}"})
    headers = {k: v for k, v in d.headers.items() if k not in ("CC", H_BLOB)}
    headers.update({
        "x-sagmq-reason": reason[:2000],
        "x-sagmq-queue": d.queue,
        "x-sagmq-routing-key": d.routing_key,
        "x-sagmq-original-type": d.msg_type,
        "x-sagmq-original-user": d.user_id or "",
        "x-sagmq-original-message-id": d.message_id or "",
        "x-sagmq-dead-at": int(time.time() * 1000),  # AMQP tables take no floats
    })
    return headers
