"""MemoryBus: the Bus interface over a MemoryBroker, so each service's choreography runs without RabbitMQ.

It keeps AmqpBus's behaviour where a service can see it: every message goes through the real
encoding (``to_wire`` and ``codec.pack``; arrays above ``settings.chunk_bytes`` as blob parts),
``user_id`` is the bus's user (another user tests spoofing), consumers get up to their prefetch,
handlers' errors dead-letter with the same ``x-sagmq-*`` headers, blobs are reassembled before
the handler unless ``stream=True``, and ``reset`` is a lost connection (every unacked delivery
comes back redelivered, the generation grows, ``on_reconnect`` callbacks run).

Differences a test may notice: a send is routed at once (the broker "confirms" it on the spot)
and its ``on_done`` runs at the bus's next ``process()``; ``retain`` changes nothing, since no
connection is ever really lost. ``rpc`` publishes the request and then serves this bus (its own
consumers and callbacks, as pika's BlockingConnection does) until the reply comes: the
responder must be another bus served by its own thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sagmq.memory.broker import REPLY_TO, Envelope, MemoryBroker
from sagmq.wire.blob import H_PART, Reassembler, is_part, split
from sagmq.wire.bus import Bus, Delivery, Done, Handler, dead_letter_headers, run_handler
from sagmq.wire.codec import pack
from sagmq.wire.errors import BrokerRefused, DecodeError, RpcTimeout, SagmqError
from sagmq.wire.messages import SCHEMA_VERSION, Message, bulk_bytes
from sagmq.wire.settings import Settings
from sagmq.wire.topology import Names, Topology

log = logging.getLogger(__name__)

# run() waits for work at most this long at a time: a stop event set by another thread cannot
# notify the broker's condition, so the loop looks at it this often (MemoryBroker.wake is quicker)
STOP_CHECK_S = 0.05
MAX_BATCH = 10_000  # deliveries served by one process() at most

__all__ = ["MemoryBroker", "MemoryBus"]


@dataclass(slots=True)
class _Consumer:
    queue: str
    handler: Handler
    prefetch: int
    stream: bool
    unacked: int = 0

    def has_room(self) -> bool:
        return self.prefetch == 0 or self.unacked < self.prefetch


@dataclass(slots=True)
class _Unacked:
    consumer: _Consumer
    env: Envelope


@dataclass(slots=True)
class _Settled:
    on_done: Done | None
    error: SagmqError | None
    what: str


class MemoryBus:
    """A Bus on a MemoryBroker, owned by one thread like AmqpBus (see the module docstring)."""

    def __init__(self, broker: MemoryBroker, settings: Settings, service: str, user: str | None = None) -> None:
        self.broker = broker
        self.settings = settings
        self.service = service
        self.user = settings.amqp_user if user is None else user
        self.names = Names(settings.prefix)
        self.dead_lettered = 0
        self.on_reconnect: list[Callable[[], None]] = []
        self._connected = False
        self._generation = 0
        self._topologies: list[Topology] = []
        self._consumers: list[_Consumer] = []
        self._turn = 0  # the consumer served first next time (round robin)
        self._tags = itertools.count(1)
        self._unacked: dict[int, _Unacked] = {}
        self._calls: deque[Callable[[], None]] = deque()  # guarded by broker.lock (other threads add)
        self._settled: deque[_Settled] = deque()
        self._blobs: Reassembler[Delivery] = Reassembler(settings.max_model_bytes, settings.max_body_bytes,
                                                         settings.chunk_timeout_s)
        self._reset_pending = ""
        self._reply_box: str | None = None
        self._poison: dict[str, str] = {}  # message ids whose handling the broker refused

    # --- connection -------------------------------------------------------------------

    def connect(self) -> MemoryBus:
        """'Connect': declare the topologies and check the consumers' queues exist."""
        self._connected = True
        self._generation += 1
        for topo in self._topologies:
            self.broker.declare(topo)
        for c in self._consumers:
            self._check_queue(c.queue)
        return self

    def close(self, flush_s: float = 10.0) -> None:
        """Run the settled sends' callbacks, then give every unacked delivery back to its queue."""
        if not self._connected:
            return
        self._run_settled()
        self._give_back()
        self._connected = False

    def reset(self, why: str) -> None:
        """Drop the 'connection' once the current callback returns (all unacked come back)."""
        self._reset_pending = why

    def _reset_now(self) -> None:
        why, self._reset_pending = self._reset_pending, ""
        log.warning("connection lost (%s); reconnecting", why)
        self._give_back()
        self._blobs.clear()
        self._generation += 1
        for fn in self.on_reconnect:
            fn()

    def _give_back(self) -> None:
        """Requeue every unacked delivery, redelivered, in order (what a closed channel does)."""
        by_queue: dict[str, list[Envelope]] = {}
        for _, u in sorted(self._unacked.items()):
            by_queue.setdefault(u.consumer.queue, []).append(u.env)
            u.consumer.unacked -= 1
        self._unacked.clear()
        for queue, envs in by_queue.items():
            self.broker.requeue(queue, envs)

    def _require(self) -> None:
        if not self._connected:
            raise SagmqError("the bus is not connected")

    def _check_queue(self, queue: str) -> None:
        if not self.broker.has_queue(queue):
            raise BrokerRefused(f"NOT_FOUND - no queue {queue!r}")

    # --- topology ---------------------------------------------------------------------

    def declare(self, topo: Topology) -> None:
        """Declare a topology now (or at connect); skipped with SAGMQ_DECLARE=0 as AmqpBus does."""
        if not self.settings.declare:
            return
        self._topologies.append(topo)
        if self._connected:
            self.broker.declare(topo)

    def delete(self, topo: Topology) -> None:
        """Delete a topology's queues and exchanges."""
        self._require()
        self.broker.delete(topo)

    # --- publishing -------------------------------------------------------------------

    def _envelope(self, exchange: str, routing_key: str, body: bytes, msg_type: str, headers: dict[str, Any],
                  message_id: str | None = None, reply_to: str | None = None, correlation_id: str | None = None,
                  expiration_s: float | None = None, persistent: bool = True) -> Envelope:
        """A message with the properties every sagmq message carries (as AmqpBus.properties)."""
        h: dict[str, Any] = {"schema": SCHEMA_VERSION, "service": self.service}
        h.update({k: v for k, v in headers.items() if v is not None})
        # AMQP expiration is whole milliseconds, at least 1
        expires = None if expiration_s is None else time.monotonic() + max(1, int(expiration_s * 1000)) / 1000
        return Envelope(exchange, routing_key, body, msg_type, h, self.user, message_id or uuid.uuid4().hex,
                        correlation_id, reply_to, expires, persistent)

    def _encode(self, exchange: str, routing_key: str, msg: Message, headers: dict[str, Any] | None,
                cc: list[str] | None, reply_to: str | None = None, correlation_id: str | None = None,
                expiration_s: float | None = None, persistent: bool = True) -> list[Envelope]:
        """A message as the envelope(s) it travels as: one, or the parts of a blob."""
        wire = msg.to_wire()
        h = dict(headers or {})
        if cc:
            h["BCC"] = list(cc)  # as the AMQP bus sends it (the broker removes it before delivery)
        chunk = self.settings.chunk_bytes
        if bulk_bytes(msg, wire) > chunk:
            blob = uuid.uuid4().hex
            return [self._envelope(exchange, routing_key, part.body, msg.TYPE, {**h, **part.headers},
                                   f"{blob}-{part.headers[H_PART]}", reply_to, correlation_id, expiration_s,
                                   persistent)
                    for part in split(wire, chunk, blob)]
        body = pack(wire)
        if len(body) > self.settings.max_body_bytes:
            raise SagmqError(f"{msg.TYPE} message of {len(body)} bytes exceeds "
                             f"SAGMQ_MAX_BODY_BYTES={self.settings.max_body_bytes}")
        return [self._envelope(exchange, routing_key, body, msg.TYPE, h, None, reply_to, correlation_id,
                               expiration_s, persistent)]

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
        """Publish one message (routed at once); SagmqError if a mandatory one is unroutable.
        An advisory message of one body is neither mandatory nor persistent, as with AmqpBus."""
        self._require()
        envs = self._encode(exchange, routing_key, msg, headers, cc, reply_to, correlation_id, expiration_s,
                            persistent and not advisory)
        if advisory and len(envs) == 1:
            mandatory = False
        for env in envs:
            self.broker.publish(env, mandatory)

    def publish_bytes(self, exchange: str, routing_key: str, body: bytes, msg_type: str,
                      headers: dict[str, Any] | None = None, persistent: bool = True) -> None:
        """Publish a prepared body, mandatory."""
        self._require()
        self.broker.publish(self._envelope(exchange, routing_key, body, msg_type, dict(headers or {}),
                                           persistent=persistent))

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
        """Publish now; on_done(None or the error) runs at this bus's next process()."""
        self._require()
        envs = self._encode(exchange, routing_key, msg, headers, cc, expiration_s=expiration_s, persistent=persistent)
        error: SagmqError | None = None
        try:
            for env in envs:
                self.broker.publish(env, mandatory=True)
        except SagmqError as e:  # as a nack or a return: reported through on_done, not raised
            error = e
        self._settled.append(_Settled(on_done, error, f"{msg.TYPE} to {exchange!r} ({routing_key!r})"))

    @property
    def sending(self) -> int:
        """Sends whose on_done has not run yet."""
        return len(self._settled)

    @property
    def generation(self) -> int:
        """Counts 'connections': deliveries of an older generation can no longer be acked."""
        return self._generation

    def flush_sends(self, timeout_s: float) -> bool:
        """Run the settled sends' callbacks (every send is settled at once here)."""
        self._run_settled()
        return not self._settled

    def _run_settled(self) -> bool:
        done = bool(self._settled)
        while self._settled:
            s = self._settled.popleft()
            if s.error is not None:
                log.error("%s", s.error)
            if s.on_done is not None:
                try:
                    s.on_done(s.error)
                except Exception:  # as AmqpBus: a failing callback is logged, the loop goes on
                    log.exception("completing %s failed", s.what)
        return done

    def reply(self, request: Delivery, msg: Message) -> None:
        """Answer an RPC request on its reply_to with its correlation_id (dropped if the requester left)."""
        if not request.reply_to:
            log.warning("request %s has no reply_to; reply dropped", request.message_id)
            return
        try:
            self.publish("", request.reply_to, msg, correlation_id=request.correlation_id, mandatory=False,
                         persistent=False)
        except SagmqError as e:  # the requester left; nothing else to do
            log.warning("reply to %s not delivered: %s", request.reply_to, e)

    # --- consuming --------------------------------------------------------------------

    def consume(self, queue: str, handler: Handler, prefetch: int = 16, stream: bool = False) -> None:
        """Deliver a queue's messages to handler (blobs assembled first unless stream)."""
        if self._connected:
            self._check_queue(queue)
        self._consumers.append(_Consumer(queue, handler, prefetch, stream))

    def _next(self) -> tuple[_Consumer, Envelope, int] | None:
        """The next message for a consumer with room, consumers taken in turn."""
        n = len(self._consumers)
        for i in range(n):
            c = self._consumers[(self._turn + i) % n]
            if not c.has_room():
                continue
            env = self.broker.pop(c.queue)
            if env is not None:
                self._turn = (self._turn + i + 1) % n
                tag = next(self._tags)
                c.unacked += 1
                self._unacked[tag] = _Unacked(c, env)
                return c, env, tag
        return None

    def _delivery(self, queue: str, env: Envelope, tag: int) -> Delivery:
        return Delivery(queue, env.exchange, env.routing_key, env.msg_type, dict(env.headers), env.user_id,
                        env.message_id, env.correlation_id, env.reply_to, env.redelivered, env.body, tag,
                        self._generation)

    def _dispatch(self, c: _Consumer, env: Envelope, tag: int) -> None:
        d = self._delivery(c.queue, env, tag)
        if is_part(d.headers) and not c.stream:
            whole = self._assemble(c, d)
            if whole is None:
                return
            d = whole
        refused = run_handler(c.handler, d, self._poison, self)
        if refused is not None:  # as RabbitMQ: the channel closes; the message comes back and goes then
            self.reset(f"channel closed by the broker: {refused}")

    def _assemble(self, c: _Consumer, d: Delivery) -> Delivery | None:
        """Add a blob part; the whole message (its parts held in .parts) once every part is in."""
        step = self._blobs.add(c.queue, d.headers, d.body, d)
        if step.kind == "pending":
            if step.copied:
                d.body = b""  # copied into the assembly: hold only the delivery tag
            return None
        if step.kind == "late":
            self.ack(d)  # the rest of a blob already dead-lettered with its reason
            return None
        assert step.first is not None
        if step.kind == "refused":
            self._refuse(step.first, step.rest, step.reason)
            return None
        f = step.first
        return Delivery(f.queue, f.exchange, f.routing_key, f.msg_type, f.headers, f.user_id, f.message_id,
                        f.correlation_id, f.reply_to, any(p.redelivered for p in step.held), f.body, f.tag,
                        f.generation, payload=step.message, parts=step.held)

    def _refuse(self, first: Delivery, rest: list[Delivery], reason: str) -> None:
        self.dead_letter(first, reason)
        for p in rest:
            self.ack(p)

    def ack(self, d: Delivery) -> None:
        """Ack a delivery (every part of a blob); one of an older generation is skipped (it came back)."""
        for p in d.parts or [d]:
            self._settle(p, "ack")

    def ack_many(self, deliveries: list[Delivery]) -> None:
        """Ack deliveries that were held until their effect was durable."""
        for d in deliveries:
            self.ack(d)

    def requeue(self, d: Delivery) -> None:
        """Give a delivery (every part) back to the head of its queue, redelivered."""
        d.deferred = True
        for p in d.parts or [d]:
            self._settle(p, "requeue")

    def _settle(self, d: Delivery, how: str) -> None:
        """Ack, requeue or reject one delivery tag on its 'channel'."""
        if d.tag == 0 or d.generation != self._generation or not self._connected:
            return  # auto-acked (a reply, a browse) or of a closed channel: the broker has it back
        u = self._unacked.pop(d.tag, None)
        if u is None:  # RabbitMQ closes the channel for this: so does the memory bus
            log.error("%s of unknown delivery tag %d (%s message %s)", how, d.tag, d.msg_type, d.message_id)
            self.reset(f"PRECONDITION_FAILED - unknown delivery tag {d.tag}")
            return
        u.consumer.unacked -= 1
        if how == "requeue":
            self.broker.requeue(u.consumer.queue, [u.env])
        elif how == "reject":
            self.broker.reject(u.consumer.queue, u.env)

    def broken(self) -> bool:
        """An in-memory bus never loses its connection by itself (reset() simulates it)."""
        return False

    def dead_letter(self, d: Delivery, reason: str) -> None:
        """Log the reason, copy the message to P.dead with it, then ack the original."""
        self.dead_lettered += 1
        headers = dead_letter_headers(d, reason)
        try:
            self.broker.publish(self._envelope(self.names.dead, "", d.body, "dead", headers))
        except SagmqError:  # never lose the message: the queue's own dead-letter exchange takes it
            log.exception("could not copy the message to %s; rejecting it to the queue's dead-letter exchange",
                          self.names.dead)
            for p in d.parts or [d]:
                self._settle(p, "reject")
            return
        self.ack(d)

    def browse(self, queue: str, limit: int = 1000) -> list[Delivery]:
        """Up to limit messages of a queue, left in it (they cannot be acked)."""
        self._require()
        return [self._delivery(queue, env, 0) for env in self.broker.peek(queue, limit)]

    # --- running ----------------------------------------------------------------------

    def process(self, time_limit: float) -> None:
        """Serve callbacks, settled sends and deliveries; wait up to time_limit s if there are none."""
        self._require()
        deadline = time.monotonic() + time_limit
        if not self._serve(deadline):
            self._wait(deadline)
            self._serve(deadline)
        if self._reset_pending:
            self._reset_now()

    def _serve(self, deadline: float) -> bool:
        """Run what is ready now; True if anything. Deliveries go until none is ready, or until the
        deadline passed if it is in the future (process(0) serves all that is ready, as pika's does
        with what it has read, up to MAX_BATCH: a handler that requeues forever must not hang it)."""
        did = self._run_calls()
        did = self._run_settled() or did
        timed = deadline > time.monotonic()
        for _ in range(MAX_BATCH):
            item = self._next()
            if item is None:
                break
            did = True
            self._dispatch(*item)
            if self._reset_pending:
                self._reset_now()
            if timed and time.monotonic() >= deadline:
                break
        return did

    def _has_work(self) -> bool:
        """(broker lock held) Whether process() has something to do."""
        if self._calls or self._settled or self._reset_pending:
            return True
        if self._reply_box is not None and self.broker.ready(self._reply_box):
            return True
        return any(c.has_room() and self.broker.ready(c.queue) for c in self._consumers)

    def _wait(self, deadline: float) -> None:
        with self.broker.changed:
            self.broker.changed.wait_for(self._has_work, max(0.0, deadline - time.monotonic()))

    def _run_calls(self) -> bool:
        with self.broker.lock:
            calls, self._calls = list(self._calls), deque()
        for fn in calls:
            fn()
        return bool(calls)

    def run(self, stop: threading.Event, tick: Callable[[], None] | None = None, tick_s: float = 0.1) -> None:
        """Serve until stop is set, calling tick every tick_s seconds."""
        next_tick = time.monotonic()
        while not stop.is_set():
            self.process(min(tick_s, STOP_CHECK_S, max(0.001, next_tick - time.monotonic())))
            self._expire_blobs()
            if tick is not None and time.monotonic() >= next_tick:
                try:
                    tick()
                except SagmqError as e:  # as AmqpBus: e.g. a refused publish; tried again next tick
                    log.error("%s", e)
                next_tick = time.monotonic() + tick_s

    def _expire_blobs(self) -> None:
        if len(self._blobs):
            for step in self._blobs.expire():
                assert step.first is not None
                self._refuse(step.first, step.rest, step.reason)

    def call_threadsafe(self, fn: Callable[[], None]) -> None:
        """Run fn on the bus's own thread at its next process() (the only cross-thread call)."""
        if not self._connected:
            raise SagmqError("the bus is not connected")
        with self.broker.changed:
            self._calls.append(fn)
            self.broker.changed.notify_all()

    # --- RPC ------------------------------------------------------------------------

    def rpc(self, exchange: str, routing_key: str, msg: Message, timeout_s: float) -> Delivery:
        """Send a request and serve this bus until its reply comes (RpcTimeout after timeout_s)."""
        self._require()
        box = self.broker.open_reply_queue()
        self._reply_box = box
        corr = uuid.uuid4().hex
        replies: Reassembler[None] = Reassembler(self.settings.max_model_bytes, self.settings.max_body_bytes,
                                                 timeout_s)
        try:
            self.publish(exchange, routing_key, msg, reply_to=box, correlation_id=corr, expiration_s=timeout_s)
            deadline = time.monotonic() + timeout_s
            while True:
                env = self.broker.pop(box)
                if env is None:
                    if time.monotonic() >= deadline:
                        raise RpcTimeout(f"no reply to {msg.TYPE} {routing_key!r} within {timeout_s:g} s")
                    self.process(min(deadline - time.monotonic(), STOP_CHECK_S))
                    continue
                d = self._reply(env, corr, replies)
                if d is not None:
                    return d
        finally:
            self._reply_box = None
            self.broker.close_reply_queue(box)

    def _reply(self, env: Envelope, corr: str, replies: Reassembler[None]) -> Delivery | None:
        """A reply with our correlation id, assembled if it came in parts (None: not complete yet)."""
        if env.correlation_id != corr:
            return None
        d = self._delivery(REPLY_TO, env, 0)
        d.reply_to = None
        if not is_part(d.headers):
            return d
        step = replies.add(REPLY_TO, d.headers, d.body, None)
        if step.kind == "refused":
            raise DecodeError(f"reply to request {corr}: {step.reason}")
        if step.kind != "done":
            return None
        d.payload = step.message
        return d


def _satisfies_bus(bus: MemoryBus) -> Bus:
    """(Never called: makes mypy check that MemoryBus has the Bus interface exactly.)"""
    return bus
