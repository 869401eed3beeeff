"""Request and reply over RabbitMQ's direct reply-to, and browsing a queue without taking from it.

The reply consumer and the request share the bus's main channel (direct reply-to requires it).
A large reply (a model download) comes in parts and is put together by the same Reassembler
as consumed blobs.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Protocol

import pika

from sagmq.amqp.connection import Channel, Link
from sagmq.amqp.consume import to_delivery
from sagmq.wire.blob import Reassembler, is_part
from sagmq.wire.bus import Delivery
from sagmq.wire.errors import DecodeError, RpcTimeout, SagmqError
from sagmq.wire.messages import Message
from sagmq.wire.settings import Settings

REPLY_TO = "amq.rabbitmq.reply-to"


class RequestLost(SagmqError):
    """The connection was lost while a request waited for its reply, and it was not sent again."""


class RequestNotTaken(SagmqError):
    """The broker did not take a request (nacked, as a quorum queue does while it elects a leader, or
    unroutable): nothing was carried out, and it can be sent again."""


class Requester(Protocol):
    """What an RPC needs of the bus."""

    settings: Settings

    def publish_request(self, exchange: str, routing_key: str, msg: Message, reply_to: str, correlation_id: str,
                        expiration_s: float) -> None:
        """Publish a request, confirmed, on the current connection (raise, not reconnect, if it is lost)."""

    def between(self) -> None:
        """Work to do while waiting for the broker."""


class _Replies:
    """The replies to one request, recorded by pika's callback and assembled when waited for."""

    def __init__(self, corr: str, settings: Settings, generation: int) -> None:
        self.corr, self.generation = corr, generation
        self.raw: list[tuple[Any, Any, bytes]] = []
        self.blobs: Reassembler[None] = Reassembler(settings.max_model_bytes, settings.max_body_bytes,
                                                    settings.chunk_timeout_s)

    def on_reply(self, _ch: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
        """(pika callback) note a reply of this request."""
        if props.correlation_id == self.corr:
            self.raw.append((method, props, body))

    def take(self) -> Delivery | None:
        """The reply, once it (every part of it) is in."""
        while self.raw:
            method, props, body = self.raw.pop(0)
            d = to_delivery(REPLY_TO, method, props, body, self.generation)
            d.tag, d.reply_to, d.redelivered = 0, None, False
            if not is_part(d.headers):
                return d
            step = self.blobs.add(self.corr, d.headers, body, None)
            if step.kind == "refused":
                raise DecodeError(f"reply to request {self.corr}: {step.reason}")
            if step.kind == "done":
                d.payload = step.message
                return d
        return None


def rpc_once(bus: Requester, ch: Channel, generation: int, exchange: str, routing_key: str, msg: Message,
             timeout_s: float, sent: list[bool] | None = None) -> Delivery:
    """Send a request and wait for its reply (RpcTimeout after timeout_s), all on one connection: the
    reply consumer is set up on ch (the main channel; direct reply-to needs it on the publishing channel)
    before the request goes out, so a lost connection raises (a connection error) rather than publish on a
    new channel without it (which the broker refuses: 406 fast reply consumer does not exist). sent, if
    given, gets True once the request was handed to the broker (it may then have been carried out)."""
    replies = _Replies(uuid.uuid4().hex, bus.settings, generation)
    tag = ch.call(lambda cb: ch.ch.basic_consume(REPLY_TO, replies.on_reply, auto_ack=True, callback=cb),
                  "Basic.Consume of direct reply-to").method.consumer_tag
    try:
        if sent is not None:
            sent.append(True)
        try:
            bus.publish_request(exchange, routing_key, msg, REPLY_TO, replies.corr, timeout_s)
        except RpcTimeout:
            raise
        except SagmqError as e:  # a nack or a return: the broker has not got it
            raise RequestNotTaken(str(e)) from e
        deadline = time.monotonic() + timeout_s
        while (reply := replies.take()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RpcTimeout(f"no reply to {msg.TYPE} {routing_key!r} within {timeout_s:g} s")
            ch.raise_if_closed()
            ch.link.turn(min(left, 0.2))
            bus.between()
    finally:
        if ch.is_open:
            ch.ch.basic_cancel(tag)
    return reply


def browse(link: Link, queue: str, limit: int, generation: int) -> list[Delivery]:
    """Read up to limit messages of a queue without removing them: on a channel of its own, closed
    without acks, which puts every message back in order."""
    ch = link.channel()
    out: list[Delivery] = []
    empty: list[bool] = []
    ch.ch.add_callback(lambda _frame: empty.append(True), [pika.spec.Basic.GetEmpty], one_shot=False)
    try:
        while len(out) < limit:
            got: list[tuple[Any, Any, bytes]] = []
            ch.ch.basic_get(queue, lambda _ch, m, p, b: got.append((m, p, b)), auto_ack=False)  # noqa: B023
            link.wait(lambda: bool(got or empty) or ch.closed is not None, 30, f"Basic.Get from {queue!r}")  # noqa: B023
            ch.raise_if_closed()
            if not got:
                break
            out.append(to_delivery(queue, *got[0], generation))
    finally:
        if ch.is_open:
            ch.ch.close()
            link.wait(lambda: ch.closed is not None, 10, "closing the browsing channel")
    return out
