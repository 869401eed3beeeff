"""AmqpBus: the Bus interface on RabbitMQ, composed of the modules beside it.

One ``pika.SelectConnection`` owned by one thread (``connection.Link``), turned by ``process()``.
Its main channel (confirm mode) declares, publishes with a wait for the confirm (``publish``),
consumes, acks and carries RPCs; advisory events and ``send`` have channels of their own.
pika's callbacks only record what happened; handlers, ``on_done`` callbacks and thread-safe
calls run from ``process()`` at top level, so they may publish (which turns the loop until the
confirm) without re-entering pika. On a lost connection the bus reconnects with jittered
backoff, redeclares its topology, resumes its consumers and sends again what was not confirmed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import pika
import pika.exceptions as px

from sagmq.amqp import rpc
from sagmq.amqp.connection import (
    CONNECTION_ERRORS,
    Channel,
    ConnectionLost,
    Link,
    parameters,
    retryable,
    safe_url,
    unavailable,
    with_retry,
)
from sagmq.amqp.consume import Consumer, Consuming
from sagmq.amqp.fastpath import FastPath, install
from sagmq.amqp.publish import Advisory, Confirmed, Envelope, encode, properties
from sagmq.amqp.send import Send, Sender
from sagmq.runtime.metrics import Meter
from sagmq.wire.bus import Delivery, Done, Handler, dead_letter_headers
from sagmq.wire.errors import BrokerRefused, SagmqError
from sagmq.wire.messages import Message
from sagmq.wire.settings import Settings
from sagmq.wire.topology import Names, Queue, Topology, arguments_advice

log = logging.getLogger(__name__)
T = TypeVar("T")

NOT_TAKEN_PAUSE_S = 0.5  # before a request the broker did not take (nacked) is sent again


class AmqpBus:
    """A confirmed, reconnecting connection to the broker for one thread (see wire.bus.Bus)."""

    def __init__(self, settings: Settings, service: str, connect_timeout_s: float = 300.0,
                 meter: Meter | None = None) -> None:
        self.settings = settings
        self.service = service
        self.meter = meter or Meter(service, settings.site)  # counts what crosses this bus (runtime.metrics)
        self.names = Names(settings.prefix)
        self.connect_timeout_s = connect_timeout_s
        self.dead_lettered = 0
        self.on_reconnect: list[Callable[[], None]] = []
        self._generation = 0
        self._topologies: list[Topology] = []
        self._link: Link | None = None
        self._main: Channel | None = None
        self._fast: FastPath | None = None
        self._confirmed = Confirmed(self._written)
        self._advisory = Advisory(self._written)
        self.sender = Sender(settings, self._open_channel, self._written)
        self.consuming = Consuming(settings, self, self.meter)
        self._calls: deque[Callable[[], None]] = deque()  # from call_threadsafe, run by process()
        self._reset_pending = ""
        self._admin: Any = None  # pika.BlockingConnection of the admin channel, opened on first use
        self._admin_ch: Any = None

    # --- connection -----------------------------------------------------------------

    def connect(self) -> AmqpBus:
        """Open the connection, retrying connection errors (not bad credentials nor refused TLS)."""
        with_retry(self._open_once, self.connect_timeout_s, self.settings.amqp_url)
        log.info("connected to broker %s as %s", safe_url(self.settings.amqp_url), self.service)
        return self

    def _open_once(self) -> None:
        link = Link(parameters(self.settings, self.service)).open()
        self._link = link
        try:
            # each connection has a transport of its own to speed up; why not is said at the first only
            self._fast = install(link.conn, self.settings.pika_fastpath, link.turn, quiet=self._generation > 0)
            self._main = link.channel(confirm=self._confirmed.on_confirm, on_return=self._confirmed.on_return)
            self._confirmed.use(self._main)
            self._advisory.reset()
            self.sender.restart()
            self._generation += 1  # before the consumers start: their deliveries are of this connection
            for topo in self._topologies:
                self._declare(topo)
            for c in self.consuming.consumers:
                self._start_consumer(c)
        except BaseException:
            self._drop()
            raise

    def _open_channel(self, **callbacks: Any) -> Channel:
        return self._live_link().channel(**callbacks)

    def _live_link(self) -> Link:
        if self._link is None:
            raise ConnectionLost("not connected")
        return self._link

    def _written(self, nbytes: int, kind: str | None = None) -> None:
        if kind is not None:  # a publish (not an ack)
            self.meter.count_sent(kind, nbytes)
        if self._fast is not None:
            self._fast.written(nbytes)

    def broken(self) -> bool:
        """Whether the connection or the main channel is gone (the next process() reconnects)."""
        link, main = self._link, self._main
        return link is None or link.lost is not None or not link.conn.is_open or main is None or not main.is_open

    def _reconnect(self, why: BaseException) -> None:
        log.warning("connection lost (%s: %s); reconnecting", type(why).__name__, why)
        self.meter.count_reconnect()
        self._drop()
        self.consuming.reset()
        self.connect()
        for fn in self.on_reconnect:  # unacked deliveries come back: services drop what they held
            fn()

    def _drop(self) -> None:
        link, self._link, self._main = self._link, None, None
        self._advisory.reset()
        if link is not None:
            link.shut(1.0)

    def reset(self, why: str) -> None:
        """Drop the connection on purpose, once the current callback returns: every unacked
        delivery is redelivered and the service rebuilds its state from them."""
        self._reset_pending = why

    def close(self, flush_s: float = 10.0) -> None:
        """Close the connection (pending unacked deliveries are requeued by the broker), after up to
        flush_s seconds for unconfirmed sends to be confirmed (no reconnecting for them)."""
        deadline = time.monotonic() + flush_s
        while self.sender.sends and not self.broken() and time.monotonic() < deadline:
            try:
                self._settle()
                self._live_link().turn(0.05)
            except Exception as e:  # closing anyway
                log.warning("closing: sends not flushed (%s)", e)
                break
        if self.sender.sends:
            log.warning("closing with %d send(s) unconfirmed", len(self.sender.sends))
        self._drop()
        self._drop_admin()

    @property
    def channel(self) -> Any:
        """An admin channel for tools and tests (inspecting queues, injecting raw messages): a
        confirm-mode ``pika.BlockingChannel`` on a connection of its own, opened on first use and
        again if the broker closed it; closed by close(). Services never use it."""
        if self._admin_ch is None or not self._admin_ch.is_open:
            if self._admin is None or not self._admin.is_open:
                self._admin = blocking_connection(self.settings, f"{self.service}-admin")
            self._admin_ch = self._admin.channel()
            self._admin_ch.confirm_delivery()
        return self._admin_ch

    def on_admin_channel(self, fn: Callable[[Any], T]) -> T:
        """fn(channel) on the admin channel; once more on a new connection if the first was lost (a
        broker node gone). The broker's refusals (ChannelClosedByBroker: 404, 405) reach the caller."""
        try:
            return fn(self.channel)
        except CONNECTION_ERRORS as e:
            log.info("admin connection lost (%s: %s); opening a new one", type(e).__name__, e)
            self._drop_admin()
            return fn(self.channel)

    def _drop_admin(self) -> None:
        admin, self._admin, self._admin_ch = self._admin, None, None
        if admin is not None:
            try:
                admin.close()
            except Exception as e:  # a broken admin connection is let go anyway
                log.debug("closing the admin connection: %r", e)

    @property
    def generation(self) -> int:
        """Counts connections: deliveries of an older generation can no longer be acked."""
        return self._generation

    # --- topology -------------------------------------------------------------------

    def declare(self, topo: Topology) -> None:
        """Declare a topology now and again after every reconnect (skipped with SAGMQ_DECLARE=0)."""
        if not self.settings.declare:
            return
        self._topologies.append(topo)
        if self._main is not None:
            self._declare(topo)

    def _main_channel(self) -> Channel:
        if self._main is None:
            raise SagmqError("the bus is not connected")
        return self._main

    def _declare(self, topo: Topology) -> None:
        ch = self._main_channel()
        for ex in topo.exchanges:
            ch.sync("exchange_declare", ex.name, ex.type, durable=True)
        for q in topo.queues:
            if q.tolerant:
                self._declare_tolerant(q)
            else:
                ch.sync("queue_declare", q.name, durable=True, arguments=q.arguments)
        for b in topo.bindings:
            ch.sync("queue_bind", b.queue, b.exchange, routing_key=b.routing_key)

    def _declare_tolerant(self, q: Queue) -> None:
        """Declare a queue whose arguments changed since the first release on a channel of its own: on an
        existing queue with other arguments the broker refuses (406 PRECONDITION_FAILED) and closes that
        channel, not the main one. The queue is then used as it is, and the log says how to apply them."""
        side = self._live_link().channel()
        try:
            side.sync("queue_declare", q.name, durable=True, arguments=q.arguments)
        except px.ChannelClosedByBroker as e:
            if e.reply_code != 406:
                raise
            log.warning("%s", arguments_advice(q, f"{e.reply_code} {e.reply_text}"))
        finally:
            if side.is_open:
                side.ch.close()

    def delete(self, topo: Topology) -> None:
        """Delete a topology's queues and exchanges."""
        ch = self._main_channel()
        for q in topo.queues:
            ch.sync("queue_delete", q.name)
        for ex in topo.exchanges:
            ch.sync("exchange_delete", ex.name)

    # --- publishing -----------------------------------------------------------------

    def properties(self, msg_type: str, headers: dict[str, Any] | None = None, reply_to: str | None = None,
                   correlation_id: str | None = None, expiration_s: float | None = None, persistent: bool = True,
                   message_id: str | None = None) -> pika.BasicProperties:
        """AMQP properties every sagmq message carries."""
        return properties(self.settings, self.service, msg_type, headers, reply_to, correlation_id, expiration_s,
                          persistent, message_id)

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
        """Publish one message, confirmed and (unless told otherwise) persistent; as a blob of parts
        when its arrays are large. Transient suits events that are re-sent or re-derived after a broker
        restart: the broker confirms them without a disk write. An advisory message (heartbeats,
        verdicts, round.open/close) goes transient and unconfirmed on a channel of its own, so it
        never waits: its receiver copes with loss and with it overtaking confirmed messages."""
        env = Envelope(headers, cc, reply_to, correlation_id, expiration_s, persistent and not advisory)
        encoded = encode(self.settings, self.service, msg, env)
        if advisory and not encoded.parts:
            body, props = next(encoded.bodies())
            self._publish_advisory(exchange, routing_key, body, props)
            return
        for body, props in encoded.bodies():
            self.publish_raw(exchange, routing_key, body, props, mandatory)

    def _publish_advisory(self, exchange: str, routing_key: str, body: bytes, props: pika.BasicProperties) -> None:
        for attempt in (1, 2):
            try:
                self._advisory.publish(self._live_link(), exchange, routing_key, body, props)
                return
            except CONNECTION_ERRORS as e:
                if attempt == 2:
                    raise
                self._reconnect(e)

    def publish_bytes(self, exchange: str, routing_key: str, body: bytes, msg_type: str,
                      headers: dict[str, Any] | None = None, persistent: bool = True) -> None:
        """Publish a prepared body, confirmed and mandatory."""
        self.publish_raw(exchange, routing_key, body, self.properties(msg_type, headers, persistent=persistent))

    def publish_raw(
        self, exchange: str, routing_key: str, body: bytes, props: pika.BasicProperties, mandatory: bool = True
    ) -> None:
        """Publish prepared bytes, confirmed; raise SagmqError if unroutable or nacked, BrokerRefused if
        the broker closed the channel over it (403, 406; the bus reconnects first)."""
        for attempt in (1, 2):
            try:
                self._confirmed.publish(exchange, routing_key, body, props, mandatory, self.between)
                return
            except px.ChannelClosedByBroker as e:
                self._reconnect(e)  # the channel is gone: restore it and the consumers on it
                if e.reply_code in (403, 406):
                    raise BrokerRefused(f"the broker refused a message to {exchange!r} with key {routing_key!r}: "
                                        f"{e.reply_code} {e.reply_text}") from e
                if attempt == 2:
                    raise
            except CONNECTION_ERRORS as e:
                if attempt == 2:
                    raise
                self._reconnect(e)

    def between(self) -> None:
        """While a call waits for the broker: keep sends flowing (their on_done waits for process())."""
        if self.sender.due and self.sender.sends:
            self.sender.pump()

    # --- sends: confirmed publishes that do not wait -----------------------------------

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
        """Publish like publish() (persistent unless told otherwise, confirmed, mandatory; large arrays as parts) without
        waiting for the broker (see send.py). on_done(None), or on_done(error) if the broker refused or
        could not route it, runs on this bus's thread once every part is confirmed. After a lost
        connection, whatever was not confirmed is sent again from its first part. With retain=False
        the message is let go once its last part is out: one that a lost connection leaves
        unconfirmed then fails (on_done(error)) instead."""
        encoded = encode(self.settings, self.service, msg,
                         Envelope(headers, cc, expiration_s=expiration_s, persistent=persistent))
        what = f"{msg.TYPE} to {exchange!r} ({routing_key!r})"
        self.sender.add(Send(exchange, routing_key, encoded.bodies, True, on_done, what, retain=retain))
        self._pump_safe()

    @property
    def sending(self) -> int:
        """Sends not yet confirmed (or failed)."""
        return len(self.sender.sends)

    def flush_sends(self, timeout_s: float) -> bool:
        """Serve I/O until every send is settled or timeout_s passes; True if none is left."""
        deadline = time.monotonic() + timeout_s
        while self.sender.sends and time.monotonic() < deadline and self._link is not None:
            self.process(min(0.05, max(0.0, deadline - time.monotonic())))
        return not self.sender.sends

    def _pump_safe(self) -> None:
        try:
            if self._link is not None:
                self.sender.pump()
        except (*CONNECTION_ERRORS, px.AMQPError) as e:  # process() reconnects (and sends again)
            log.debug("sending paused: %r", e)
            if self._link is not None and self._link.lost is None:
                self._link.lost = e

    def _settle(self) -> None:
        """Finish the sends that are confirmed or failed (their on_done), then send more."""
        done = self.sender.settle()
        if self.sender.reopen:
            self.sender.reopen = False
            self.reset("the broker keeps refusing a send (nack): a new connection, whose channels find "
                       "each queue's current leader")
        for snd in done:
            if snd.error is not None:
                log.error("%s", snd.error)
            if snd.on_done is not None:
                try:
                    snd.on_done(snd.error)
                except Exception:
                    if self.broken():
                        raise
                    log.exception("completing %s failed", snd.what)
        self._pump_safe()

    # --- consuming ------------------------------------------------------------------

    def consume(self, queue: str, handler: Handler, prefetch: int = 16, stream: bool = False) -> None:
        """Deliver messages of a queue to handler, now and after every reconnect.

        Blob parts are assembled before the handler sees them, unless stream is set.
        """
        c = Consumer(queue, handler, prefetch, stream)
        self.consuming.consumers.append(c)
        if self._main is not None:
            self._start_consumer(c)

    def _start_consumer(self, c: Consumer) -> None:
        ch = self._main_channel()
        ch.sync("basic_qos", prefetch_count=c.prefetch)
        ch.sync("basic_consume", c.queue, self.consuming.on_message(c, lambda: self._generation), auto_ack=False)

    def _acks_to(self, d: Delivery) -> Channel | None:
        """The channel a delivery can still be settled on (None: its connection is gone)."""
        main = self._main
        if d.generation != self._generation or main is None or not main.is_open:
            log.debug("not settling %s: its channel was replaced (the broker redelivers it)", d.message_id)
            return None
        return main

    def ack(self, d: Delivery) -> None:
        """Ack a delivery on the channel it came from (skipped if that channel is gone)."""
        if d.parts:
            for p in d.parts:
                self.ack(p)
            return
        ch = self._acks_to(d)
        if ch is not None:
            ch.ch.basic_ack(d.tag)
            self._written(0)

    def ack_many(self, deliveries: list[Delivery]) -> None:
        """Ack deliveries that were held (deferred) until their effect was durable."""
        for d in deliveries:
            self.ack(d)

    def requeue(self, d: Delivery) -> None:
        """Give a delivery back to its queue, to come again (for something that is not ready yet)."""
        d.deferred = True
        ch = self._acks_to(d)
        if ch is not None:
            ch.ch.basic_nack(d.tag, requeue=True)
            self._written(0)

    def dead_letter(self, d: Delivery, reason: str) -> None:
        """Log the reason, copy the message to P.dead with it, and ack the original once the copy is
        confirmed. The copy does not wait for its confirm (it is a send): a flood of junk is
        dead-lettered at the broker's pace, not one round trip and disk sync per message. A copy that
        the connection's loss leaves unconfirmed is let go: the original comes back and is copied again."""
        self.dead_lettered += 1
        self.meter.count_dead_letter(reason)
        d.deferred = True  # acked (or rejected) when the copy is settled
        props = self.properties("dead", dead_letter_headers(d, reason))
        body = d.body

        def settled(err: SagmqError | None) -> None:
            if err is None:
                self.ack(d)
                return
            # never lose the message: let the queue's own DLX take it, reason logged above
            log.error("could not copy the message to %s (%s); rejecting it to the queue's dead-letter exchange",
                      self.names.dead, err, extra={"rate_kind": f"dead-letter copy {d.queue}"})
            for p in d.parts or [d]:
                ch = self._acks_to(p)
                if ch is not None:
                    ch.ch.basic_nack(p.tag, requeue=False)

        self.sender.add(Send(self.names.dead, "", lambda: iter(((body, props),)), True, settled,
                             f"dead letter from {d.queue!r}", retain=False))
        self._pump_safe()

    def expire_blobs(self) -> None:
        """Dead-letter blobs whose missing parts did not come within chunk_timeout_s."""
        self.consuming.expire()

    # --- running --------------------------------------------------------------------

    def process(self, time_limit: float) -> None:
        """Serve I/O (deliveries, confirms, heartbeats, thread-safe calls) for up to time_limit s:
        one turn of the loop, then what it brought, at top level."""
        try:
            link = self._live_link()
            if self.broken():
                # the broker closed our channel (e.g. a delivery held past consumer_timeout)
                raise ConnectionLost(f"the connection or its channel closed: {link.lost!r}")
            retry_at = self.sender.next_try_at()
            if retry_at and time.monotonic() >= retry_at:
                self.sender.due = True  # a refused send may go again now
            busy = self.consuming.inbox or self._calls or self.sender.due
            if retry_at and not busy:
                time_limit = min(time_limit, max(0.0, retry_at - time.monotonic()))
            link.turn(0.0 if busy else time_limit)
            self._serve()
            if self.broken():
                raise ConnectionLost(f"the connection or its channel closed: {link.lost!r}")
        except Exception as e:
            if not (isinstance(e, CONNECTION_ERRORS) or self.broken()):
                raise
            self._reconnect(e)
        if self._reset_pending:
            why, self._reset_pending = self._reset_pending, ""
            self._reconnect(SagmqError(why))

    def _serve(self) -> None:
        """What the turn brought: thread-safe calls, settled sends, deliveries for the handlers."""
        while self._calls:
            self._calls.popleft()()
        if self.sender.due:
            self._settle()
        self.consuming.dispatch()

    def run(self, stop: threading.Event, tick: Callable[[], None] | None = None, tick_s: float = 0.1) -> None:
        """Serve until stop is set, calling tick every tick_s seconds."""
        next_tick = time.monotonic()
        while not stop.is_set():
            self.process(tick_s)
            if len(self.consuming.blobs):
                self.expire_blobs()
            if tick is not None and time.monotonic() >= next_tick:
                try:
                    tick()
                except CONNECTION_ERRORS as e:
                    self._reconnect(e)
                except SagmqError as e:  # e.g. a publish the broker refused; try again next tick
                    log.error("%s", e)
                next_tick = time.monotonic() + tick_s

    def call_threadsafe(self, fn: Callable[[], None]) -> None:
        """Run fn on the bus's own thread at its next process() (the only cross-thread call)."""
        if self._generation == 0:
            raise SagmqError("the bus is not connected")
        self._calls.append(fn)
        link = self._link  # may be mid-reconnect: fn waits in the queue for the next process()
        if link is not None:
            try:
                link.ioloop.add_callback_threadsafe(_wake)
            except Exception as e:  # a loop closed by a reconnect: the next turn runs fn anyway
                log.debug("waking the bus: %r", e)

    # --- RPC ------------------------------------------------------------------------

    def reply(self, request: Delivery, msg: Message) -> None:
        """Answer an RPC request on its reply_to queue with its correlation_id."""
        if not request.reply_to:
            log.warning("request %s has no reply_to; reply dropped", request.message_id,
                        extra={"rate_kind": f"no reply_to {request.queue}"})  # one a junk message
            return
        try:
            # Not mandatory: RabbitMQ 3.10 returns direct reply-to publishes as NO_ROUTE even when delivered.
            self.publish("", request.reply_to, msg, correlation_id=request.correlation_id, mandatory=False,
                         persistent=False)
        except SagmqError as e:  # the requester left; nothing else to do
            log.warning("reply to %s not delivered: %s", request.reply_to, e,
                        extra={"rate_kind": f"reply lost {request.queue}"})

    def rpc(self, exchange: str, routing_key: str, msg: Message, timeout_s: float, resend: bool = True) -> Delivery:
        """Send a request and wait for its reply over direct reply-to, for up to timeout_s in all. A lost
        connection is rebuilt (the next broker of SAGMQ_AMQP_URL, when the first is gone) and the reply
        consumer set up again on it; a request in flight is then sent again when resend (one that only
        reads), else it fails with RequestLost: it may or may not have been carried out. One the broker
        did not take (nacked while a quorum queue elects a leader) is sent again after a pause when resend,
        else it fails with RequestNotTaken."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.broken():  # lost before (a failed reconnect of an earlier call): connect again first
                self._reconnect(ConnectionLost("the connection was lost before the request"))
            sent: list[bool] = []
            try:
                return rpc.rpc_once(self, self._main_channel(), self._generation, exchange, routing_key, msg,
                                    max(0.1, deadline - time.monotonic()), sent)
            except px.ChannelClosedByBroker as e:
                self._reconnect(e)
                raise BrokerRefused(f"the broker refused a request to {exchange!r} with key {routing_key!r}: "
                                    f"{e.reply_code} {e.reply_text}") from e
            except rpc.RequestNotTaken as e:
                if not resend or time.monotonic() + NOT_TAKEN_PAUSE_S >= deadline:
                    raise
                log.info("%s; %s %r sent again", e, msg.TYPE, routing_key)
                time.sleep(NOT_TAKEN_PAUSE_S)  # a quorum queue electing a leader: a moment
            except CONNECTION_ERRORS as e:
                self._reconnect(e)
                if sent and not resend:
                    raise rpc.RequestLost(f"the connection to the broker was lost while {msg.TYPE} "
                                          f"{routing_key!r} waited for its reply ({e}): it may or may not have "
                                          "been carried out") from e
                if time.monotonic() >= deadline:
                    raise rpc.RequestLost(f"the connection to the broker was lost while {msg.TYPE} "
                                          f"{routing_key!r} waited for its reply ({e}), and no time is left") from e
                log.info("connection lost mid-request (%s); %s %r sent again", e, msg.TYPE, routing_key)

    def publish_request(self, exchange: str, routing_key: str, msg: Message, reply_to: str, correlation_id: str,
                        expiration_s: float) -> None:
        """Publish a request (persistent, confirmed, mandatory) on this connection only: a lost connection
        raises instead of reconnecting, since the reply consumer lives on this connection's main channel."""
        env = Envelope(reply_to=reply_to, correlation_id=correlation_id, expiration_s=expiration_s)
        for body, props in encode(self.settings, self.service, msg, env).bodies():
            self._confirmed.publish(exchange, routing_key, body, props, True, self.between)

    def browse(self, queue: str, limit: int = 1000) -> list[Delivery]:
        """Read up to limit messages of a queue without removing them (they are requeued in order)."""
        if self._link is None:
            raise SagmqError("the bus is not connected")
        return rpc.browse(self._link, queue, limit, self._generation)


def open_blocking(params: Any) -> Any:
    """A pika.BlockingConnection to the first of params (one or a list) that answers, tried in turn like
    Link.open: an unreachable broker (refused, timed out, a host name that does not resolve, as Docker does
    for a killed container) passes to the next; refused credentials or TLS raise at once. pika's own list
    handling stops at the first host that does not resolve, hence one at a time. Raises the last error."""
    many = list(params) if isinstance(params, list | tuple) else [params]
    for i, p in enumerate(many):
        try:
            return pika.BlockingConnection(p)
        except (px.AMQPError, OSError) as e:
            if i + 1 == len(many) or not retryable(e):
                raise
            log.info("broker %s:%s did not answer (%s); trying the next", p.host, p.port, e)
    raise AssertionError("unreachable: no parameters")


def blocking_connection(settings: Settings, service: str) -> Any:
    """open_blocking() on SAGMQ_AMQP_URL without heartbeats (a tool's connection, idle between its
    calls); BrokerUnavailable with the reason of the last broker tried if none answers."""
    try:
        return open_blocking(parameters(settings, service, False))
    except (px.AMQPError, OSError) as e:
        raise unavailable(settings.amqp_url, e) from e


def _wake() -> None:
    """A thread-safe callback that only ends the loop's wait (the call itself runs in process())."""

