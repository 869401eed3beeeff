"""Publishing: the properties every sagmq message carries, a message as one body or as blob parts,
the blocking confirmed publish, and the unconfirmed advisory one.

A confirmed publish waits for the broker's Basic.Ack (a Basic.Nack, or a Basic.Return of a
mandatory message before its ack, makes it fail). While it waits the loop turns: deliveries
that arrive meanwhile are only queued by the consumer's callback and handled afterwards.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pika

from sagmq.amqp.connection import Channel, ConnectionLost, Link
from sagmq.wire.blob import H_PART, split
from sagmq.wire.bus import CONTENT_TYPE
from sagmq.wire.codec import pack
from sagmq.wire.errors import SagmqError
from sagmq.wire.messages import SCHEMA_VERSION, Message, bulk_bytes
from sagmq.wire.settings import Settings

CONFIRM_TIMEOUT_S = 300.0  # as long as a blocked connection may stay blocked (parameters())

Bodies = Callable[[], Iterator[tuple[bytes, pika.BasicProperties]]]


def properties(
    settings: Settings,
    service: str,
    msg_type: str,
    headers: dict[str, Any] | None = None,
    reply_to: str | None = None,
    correlation_id: str | None = None,
    expiration_s: float | None = None,
    persistent: bool = True,
    message_id: str | None = None,
) -> pika.BasicProperties:
    """AMQP properties every sagmq message carries."""
    h = {"schema": SCHEMA_VERSION, "service": service}
    if headers:
        h.update({k: v for k, v in headers.items() if v is not None})
    return pika.BasicProperties(
        content_type=CONTENT_TYPE,
        delivery_mode=pika.DeliveryMode.Persistent if persistent else pika.DeliveryMode.Transient,
        message_id=message_id or uuid.uuid4().hex,
        type=msg_type,
        timestamp=int(time.time()),
        user_id=settings.amqp_user,
        app_id="sagmq",
        headers=h,
        reply_to=reply_to,
        correlation_id=correlation_id,
        expiration=None if expiration_s is None else str(max(1, int(expiration_s * 1000))),
    )


@dataclass(frozen=True, slots=True)
class Encoded:
    """A message as the (body, properties) it travels as, made on demand; parts if a blob."""

    bodies: Bodies
    parts: bool


@dataclass(frozen=True, slots=True)
class Envelope:
    """What a message carries besides its body."""

    headers: dict[str, Any] | None = None
    cc: list[str] | None = None
    reply_to: str | None = None
    correlation_id: str | None = None
    expiration_s: float | None = None
    persistent: bool = True


def encode(settings: Settings, service: str, msg: Message, env: Envelope) -> Encoded:
    """A message as one body, or as the parts of a blob when its arrays are large: made one at a
    time and with the same ids each time they are made (a resend repeats them)."""
    wire = msg.to_wire()
    h = dict(env.headers or {})
    if env.cc:
        h["BCC"] = list(env.cc)  # sender-selected distribution; removed by the broker, unlike CC, so
        # a task fanned out to 1000 sites does not carry the 999 other names to each (pika decodes them all)
    chunk = settings.chunk_bytes

    def props(headers: dict[str, Any], message_id: str | None = None) -> pika.BasicProperties:
        return properties(settings, service, msg.TYPE, headers, env.reply_to, env.correlation_id,
                          env.expiration_s, env.persistent, message_id)

    if bulk_bytes(msg, wire) > chunk:
        blob = uuid.uuid4().hex

        def parts() -> Iterator[tuple[bytes, pika.BasicProperties]]:
            for part in split(wire, chunk, blob):
                yield part.body, props({**h, **part.headers}, f"{blob}-{part.headers[H_PART]}")

        return Encoded(parts, True)
    body = pack(wire)
    if len(body) > settings.max_body_bytes:
        raise SagmqError(f"{msg.TYPE} message of {len(body)} bytes exceeds SAGMQ_MAX_BODY_BYTES={settings.max_body_bytes}")
    one = props(h)
    return Encoded(lambda: iter(((body, one),)), False)


class Confirmed:
    """Blocking confirmed publishes on a confirm-mode channel, one at a time: the channel is opened
    with this object's on_confirm and on_return (see AmqpBus), then given to use()."""

    def __init__(self, written: Callable[[int, str | None], None]) -> None:
        self._written = written  # told of every publish, with its kind (the fast path writes; the meter counts)
        self._ch: Channel | None = None
        self._seq = 0
        self._pending: set[int] = set()
        self._nacked: set[int] = set()
        self._returned: Any = None

    def use(self, ch: Channel) -> None:
        """Publish on ch from now on (a new channel numbers its deliveries from 1)."""
        self._ch, self._seq = ch, 0
        self._pending.clear()
        self._nacked.clear()

    def on_confirm(self, frame: Any) -> None:
        """(pika callback) a Basic.Ack or Basic.Nack, for one delivery tag or all up to it."""
        m = frame.method
        tags = [t for t in self._pending if t <= m.delivery_tag] if m.multiple else [m.delivery_tag]
        for t in tags:
            self._pending.discard(t)
            if isinstance(m, pika.spec.Basic.Nack):
                self._nacked.add(t)

    def on_return(self, _ch: Any, method: Any, _props: Any, _body: bytes) -> None:
        """(pika callback) the message being published was mandatory and no queue took it."""
        self._returned = method

    def publish(self, exchange: str, routing_key: str, body: bytes, props: pika.BasicProperties,
                mandatory: bool, between: Callable[[], None] | None = None) -> None:
        """Publish and wait for the confirm; SagmqError if returned or nacked. A channel the broker
        closed raises its ChannelClosedByBroker; a lost connection ConnectionLost."""
        ch = self._ch
        if ch is None:
            raise SagmqError("the bus is not connected")
        if not ch.is_open:  # closed before this publish (e.g. by a consumer timeout): not this message's fault
            raise ConnectionLost(f"the publishing channel is closed: {ch.closed!r}")
        self._returned = None
        ch.ch.basic_publish(exchange, routing_key, body, props, mandatory=mandatory)
        self._seq += 1
        tag = self._seq
        self._pending.add(tag)
        self._written(len(body), props.type)
        ch.link.wait(lambda: tag not in self._pending or ch.closed is not None, CONFIRM_TIMEOUT_S,
                     f"a publish to {exchange!r}", between)
        if tag in self._pending:
            ch.raise_if_closed()
        if tag in self._nacked:
            self._nacked.discard(tag)
            raise SagmqError(f"the broker refused a message to {exchange!r} ({routing_key!r})")
        if self._returned is not None:
            raise SagmqError(f"message to {exchange!r} with key {routing_key!r} was unroutable")


def _ignore(_frame: Any) -> None:
    """(An advisory channel's confirms: nobody waits for them.)"""


class Advisory:
    """Transient, unconfirmed publishes on a channel of their own: they never wait for the broker."""

    def __init__(self, written: Callable[[int, str | None], None]) -> None:
        self._written = written
        self._ch: Channel | None = None

    def reset(self) -> None:
        """Forget the channel (its connection is gone)."""
        self._ch = None

    def publish(self, link: Link, exchange: str, routing_key: str, body: bytes, props: pika.BasicProperties) -> None:
        """Publish now; a channel the broker closed (e.g. a missing exchange) is replaced next time.

        The channel is in confirm mode though nothing waits for the confirms (they are dropped as they
        come): RabbitMQ enqueues an unconfirmed message into a quorum queue untracked, and one sent while
        the queue elects a new leader (a cluster node went down) can be lost for good, whereas a confirmed
        one is sent again to the new leader. Heartbeats lost that way made a live site look dead."""
        if self._ch is None or not self._ch.is_open:
            self._ch = link.channel(confirm=_ignore)
        self._ch.ch.basic_publish(exchange, routing_key, body, props)
        self._written(len(body), props.type)
