"""The only module that touches pika: connect with retry, declare, publish confirmed, consume.

A Bus is one BlockingConnection owned by one thread. Every publish is persistent,
confirmed and mandatory; every consume acks manually after the handler returns. A
handler that raises DecodeError or Rejected has its message dead-lettered with the
reason (and logged); any other exception is logged and dead-lettered too, so a bad
message never stops a service. On a lost connection the bus reconnects with jittered
backoff, redeclares its topology and resumes its consumers.
"""

from __future__ import annotations

import itertools
import logging
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions as px
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils.connection_workflow import AMQPConnectorException
from pika.adapters.utils.io_services_utils import _AsyncTransportBase
from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from sagmq.wire.blob import H_BLOB, H_PART, Assembly, is_part, part_info, split
from sagmq.wire.bus import CONTENT_TYPE, Delivery, Done, Handler
from sagmq.wire.codec import pack
from sagmq.wire.errors import BrokerRefused, BrokerUnavailable, DecodeError, Rejected, RpcTimeout, SagmqError
from sagmq.wire.messages import SCHEMA_VERSION, Message, bulk_bytes
from sagmq.wire.settings import Settings
from sagmq.wire.topology import Names, Topology

log = logging.getLogger(__name__)

_AUTH_ERRORS = (px.ProbableAuthenticationError, px.ProbableAccessDeniedError, px.AuthenticationError)
# Errors after which the connection is thrown away and rebuilt.
_CONNECTION_ERRORS = (px.AMQPConnectionError, px.AMQPChannelError, px.StreamLostError, AssertionError)
# pika reads its socket 4 KiB at a time and appends each read to its frame buffer: a 16 MiB part
# costs thousands of reads and re-copies. Reads of 256 KiB (two of the broker's 128 KiB frames)
# cut the receiving CPU per byte by about 2.7x (measured on this project's machine).
RECV_BYTES = 256 * 1024
_AsyncTransportBase._MAX_RECV_BYTES = RECV_BYTES  # (pika is pinned below 1.5, where this attribute is)

# pika writes every frame with a send() of its own: a message is at least three (method, header,
# body), and each loopback send also wakes the broker to read that one frame. One sendmsg() of
# everything buffered (up to GATHER_BUFFERS frames, no copy) does the same work in one system call.
GATHER_BUFFERS = 64
_pika_produce = _AsyncTransportBase._produce


def _produce_gathered(self: Any) -> None:
    """_AsyncTransportBase._produce, with one sendmsg() per batch of buffered frames (plain TCP only:
    an SSL socket has no sendmsg and keeps pika's own loop). Raises what sendmsg raises (EAGAIN:
    pika keeps the writer armed and calls again)."""
    sock = self._sock
    if isinstance(sock, ssl.SSLSocket):
        _pika_produce(self)
        return
    bufs = self._tx_buffers
    while bufs:
        sent = sock.sendmsg(list(itertools.islice(bufs, GATHER_BUFFERS)))
        self._tx_buffered_byte_count -= sent
        while sent:
            first = bufs[0]
            if sent >= len(first):
                bufs.popleft()
                sent -= len(first)
            else:  # a partial send: the rest of this frame goes first next time
                bufs[0] = first[sent:]
                sent = 0


_AsyncTransportBase._produce = _produce_gathered

# send(): at most this many parts (of the chunk size) or messages unconfirmed at once. One part:
# the broker is the bottleneck for large models, and at 8 sites x 200 MB a window of 2 or 6 parts
# made the aggregate's trip no faster (2.7 s and 4.3-4.9 s against 2.5-2.8 s) while the sender held
# more of it (the aggregator peaked at 349-475 MB against 284 MB)
SEND_WINDOW_PARTS = 1
# a send part from this size on is written whole before the loop goes on (input is read meanwhile);
# a smaller one with one sendmsg, the rest by the loop. At 8 x 200 MB, writing 16 MiB parts as the
# socket took them cost the broker 0.5-1.6 s more CPU a round (smaller reads) than writing them whole
WRITE_WHOLE_BYTES = 1 << 20
SEND_WINDOW_MESSAGES = 256


@dataclass(slots=True)
class _Consumer:
    queue: str
    handler: Handler
    prefetch: int
    stream: bool = False  # hand blob parts to the handler one by one instead of assembling


@dataclass(frozen=True, slots=True)
class _Encoded:
    """What _encode makes of a message: its (body, properties), made on demand; parts if a blob."""

    bodies: Callable[[], Iterator[tuple[bytes, pika.BasicProperties]]]
    parts: bool


@dataclass(slots=True)
class _Send:
    """One message handed to send(): its parts are made lazily and published as the window allows."""

    exchange: str
    routing_key: str
    make_parts: Callable[[], Iterator[tuple[bytes, pika.BasicProperties]]]
    mandatory: bool
    on_done: Done | None
    what: str
    parts: Iterator[tuple[bytes, pika.BasicProperties]] | None = None
    all_sent: bool = False
    unconfirmed: int = 0
    error: SagmqError | None = None
    retain: bool = True  # keep the message until confirmed, to send it again after a lost connection


def _let_go() -> Iterator[tuple[bytes, pika.BasicProperties]]:
    raise AssertionError("a send with retain=False is never made again")


@dataclass(slots=True)
class _State:
    topologies: list[Topology] = field(default_factory=list)
    consumers: list[_Consumer] = field(default_factory=list)


def _tls_failure(e: BaseException) -> bool:
    """A TLS handshake refusal (pika keeps TLS 1.3's late alert only as text)."""
    return isinstance(e, ssl.SSLError) or "SSLError(" in str(e)


def _retryable(e: BaseException) -> bool:
    # a handshake that times out (a black-holed network) surfaces as pika's connector errors
    lost = isinstance(e, px.AMQPConnectionError | AMQPConnectorException)
    return lost and not isinstance(e, _AUTH_ERRORS) and not _tls_failure(e)


class AmqpBus:
    """A confirmed, reconnecting connection to the broker for one thread."""

    def __init__(self, settings: Settings, service: str, connect_timeout_s: float = 300.0) -> None:
        self.settings = settings
        self.service = service
        self.names = Names(settings.prefix)
        self.connect_timeout_s = connect_timeout_s
        self._state = _State()
        self._conn: pika.BlockingConnection | None = None
        self._ch: BlockingChannel | None = None
        self._generation = 0
        self.dead_lettered = 0
        self.on_reconnect: list[Callable[[], None]] = []
        self._assemblies: dict[tuple[str, str], tuple[Assembly, list[Delivery]]] = {}
        self._refused_blobs: dict[str, float] = {}
        self._reset_pending = ""
        self._fast: BlockingChannel | None = None  # unconfirmed channel for advisory events
        self._poison: dict[str, str] = {}  # message ids whose handling the broker refused
        # send(): confirmed publishes that do not wait, on a channel of their own
        self._sends: deque[_Send] = deque()  # in order; the head ones are in flight
        self._send_ch: BlockingChannel | None = None
        self._send_seq = 0
        self._inflight: dict[int, tuple[_Send, int]] = {}  # delivery tag -> (send, body bytes)
        self._inflight_bytes = 0
        self._by_message_id: dict[str, _Send] = {}
        self._settle_due = False
        self._lost: BaseException | None = None

    # --- connection -----------------------------------------------------------------

    def _params(self) -> pika.URLParameters:
        s = self.settings
        p = pika.URLParameters(s.amqp_url)
        p.heartbeat = s.amqp_heartbeat_s
        p.blocked_connection_timeout = 300
        p.client_properties = {"connection_name": f"sagmq-{self.service}"}
        if s.amqp_url.startswith("amqps://"):
            ctx = ssl.create_default_context(cafile=s.tls_ca_file or None)
            if s.tls_cert_file:
                ctx.load_cert_chain(s.tls_cert_file, s.tls_key_file or None)
            p.ssl_options = pika.SSLOptions(ctx, s.tls_server_name or p.host)
        return p

    def _open_once(self) -> None:
        self._conn = pika.BlockingConnection(self._params())
        self._ch = self._conn.channel()
        self._ch.confirm_delivery()
        self._fast = None
        self._restart_sends()
        for topo in self._state.topologies:
            self._declare(topo)
        for c in self._state.consumers:
            self._start_consumer(c)
        self._generation += 1

    def connect(self) -> AmqpBus:
        """Open the connection, retrying connection errors (not bad credentials). The wait grows to
        at most 2-2.5 s: after a broker restart every site is back within that of the broker, well
        inside the grace the server gives silent sites (SAGMQ_CLIENT_TIMEOUT_S, 10 s)."""
        retrying = Retrying(
            retry=retry_if_exception(_retryable),
            wait=wait_exponential(multiplier=0.2, max=2) + wait_random(0, 0.5),
            stop=stop_after_delay(self.connect_timeout_s),
            before_sleep=before_sleep_log(log, logging.WARNING),
            reraise=True,
        )
        try:
            retrying(self._open_once)
        except _AUTH_ERRORS as e:
            raise BrokerUnavailable(self._safe_url(), f"the broker refused the credentials ({e!r})") from e
        except ssl.SSLError as e:
            raise BrokerUnavailable(self._safe_url(), f"TLS handshake failed: {e}") from e
        except AMQPConnectorException as e:
            raise BrokerUnavailable(self._safe_url(), f"{type(e).__name__}: {e}") from e
        except px.AMQPError as e:
            if _tls_failure(e):
                raise BrokerUnavailable(self._safe_url(), f"the broker refused TLS (client certificate missing "
                                                          f"or untrusted?): {e}") from e
            raise BrokerUnavailable(self._safe_url(), f"{type(e).__name__}: {e}") from e
        log.info("connected to broker %s as %s", self._safe_url(), self.service)
        return self

    def _safe_url(self) -> str:
        url = self.settings.amqp_url
        if "@" in url:
            scheme, rest = url.split("://", 1)
            return f"{scheme}://***@{rest.split('@', 1)[1]}"
        return url

    def _reconnect(self, why: BaseException) -> None:
        log.warning("connection lost (%s: %s); reconnecting", type(why).__name__, why)
        self._drop()
        self._assemblies.clear()
        self.connect()
        for fn in self.on_reconnect:  # unacked deliveries come back: services drop what they held
            fn()

    def _drop(self) -> None:
        conn, self._conn, self._ch, self._fast = self._conn, None, None, None
        self._send_ch = None
        if conn is None:
            return
        try:
            if conn.is_open:
                conn.close()
        except Exception:  # closing a broken connection may fail in many ways
            pass
        try:  # a connection that died leaves its I/O loop's sockets open
            conn._impl.ioloop.close()
        except Exception:
            pass

    def reset(self, why: str) -> None:
        """Drop the connection on purpose, once the current callback returns: every unacked
        delivery is redelivered and the service rebuilds its state from them."""
        self._reset_pending = why

    def close(self, flush_s: float = 10.0) -> None:
        """Close the connection (pending unacked deliveries are requeued by the broker), after up to
        flush_s seconds for unconfirmed sends to be confirmed."""
        deadline = time.monotonic() + flush_s
        while self._sends and time.monotonic() < deadline and self._conn is not None and self._conn.is_open:
            try:  # no reconnecting here: a service that stops must not wait for a broker that is gone
                self._pump()
                self._conn.process_data_events(time_limit=0.05)
            except Exception as e:  # closing anyway
                log.warning("closing: sends not flushed (%s)", e)
                break
        if self._sends:
            log.warning("closing with %d send(s) unconfirmed", len(self._sends))
        self._drop()

    @property
    def channel(self) -> BlockingChannel:
        if self._ch is None:
            raise SagmqError("the bus is not connected")
        return self._ch

    # --- topology -------------------------------------------------------------------

    def declare(self, topo: Topology) -> None:
        """Declare a topology now and again after every reconnect (skipped with SAGMQ_DECLARE=0)."""
        if not self.settings.declare:
            return
        self._state.topologies.append(topo)
        if self._ch is not None:
            self._declare(topo)

    def _declare(self, topo: Topology) -> None:
        ch = self.channel
        for ex in topo.exchanges:
            ch.exchange_declare(ex.name, ex.type, durable=True)
        for q in topo.queues:
            ch.queue_declare(q.name, durable=True, arguments=q.arguments)
        for b in topo.bindings:
            ch.queue_bind(b.queue, b.exchange, routing_key=b.routing_key)

    def delete(self, topo: Topology) -> None:
        """Delete a topology's queues and exchanges."""
        ch = self.channel
        for q in topo.queues:
            ch.queue_delete(q.name)
        for ex in topo.exchanges:
            ch.exchange_delete(ex.name)

    # --- publishing -----------------------------------------------------------------

    def properties(
        self,
        msg_type: str,
        headers: dict[str, Any] | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        expiration_s: float | None = None,
        persistent: bool = True,
        message_id: str | None = None,
    ) -> pika.BasicProperties:
        """AMQP properties every sagmq message carries."""
        h = {"schema": SCHEMA_VERSION, "service": self.service}
        if headers:
            h.update({k: v for k, v in headers.items() if v is not None})
        return pika.BasicProperties(
            content_type=CONTENT_TYPE,
            delivery_mode=pika.DeliveryMode.Persistent if persistent else pika.DeliveryMode.Transient,
            message_id=message_id or uuid.uuid4().hex,
            type=msg_type,
            timestamp=int(time.time()),
            user_id=self.settings.amqp_user,
            app_id="sagmq",
            headers=h,
            reply_to=reply_to,
            correlation_id=correlation_id,
            expiration=None if expiration_s is None else str(max(1, int(expiration_s * 1000))),
        )

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
        encoded = self._encode(msg, headers, cc, reply_to, correlation_id, expiration_s,
                               persistent and not advisory)
        if advisory and not encoded.parts:
            body, props = next(encoded.bodies())
            self._publish_advisory(exchange, routing_key, body, props)
            return
        for body, props in encoded.bodies():
            self.publish_raw(exchange, routing_key, body, props, mandatory)

    def _encode(self, msg: Message, headers: dict[str, Any] | None, cc: list[str] | None,
                reply_to: str | None = None, correlation_id: str | None = None,
                expiration_s: float | None = None, persistent: bool = True) -> _Encoded:
        """A message as the (body, properties) it travels as: one, or the parts of a blob, made one
        at a time and with the same ids each time they are made (a resend repeats them)."""
        wire = msg.to_wire()
        h = dict(headers or {})
        if cc:
            h["CC"] = list(cc)
        chunk = self.settings.chunk_bytes
        if bulk_bytes(msg, wire) > chunk:
            blob = uuid.uuid4().hex

            def parts() -> Iterator[tuple[bytes, pika.BasicProperties]]:
                for part in split(wire, chunk, blob):
                    yield part.body, self.properties(msg.TYPE, {**h, **part.headers}, reply_to, correlation_id,
                                                     expiration_s, persistent,
                                                     message_id=f"{blob}-{part.headers[H_PART]}")

            return _Encoded(parts, True)
        body = pack(wire)
        if len(body) > self.settings.max_body_bytes:
            raise SagmqError(
                f"{msg.TYPE} message of {len(body)} bytes exceeds SAGMQ_MAX_BODY_BYTES={self.settings.max_body_bytes}"
            )
        props = self.properties(msg.TYPE, h, reply_to, correlation_id, expiration_s, persistent)
        return _Encoded(lambda: iter(((body, props),)), False)

    def _publish_advisory(self, exchange: str, routing_key: str, body: bytes, props: pika.BasicProperties) -> None:
        for attempt in (1, 2):
            try:
                if self._fast is None or not self._fast.is_open:
                    if self._conn is None:
                        raise px.AMQPConnectionError("not connected")
                    self._fast = self._conn.channel()
                self._fast._impl.basic_publish(exchange, routing_key, body, props)
                self._write_now()
                return
            except _CONNECTION_ERRORS as e:
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
        """Publish prepared bytes, confirmed; raise SagmqError if unroutable or nacked."""
        for attempt in (1, 2):
            try:
                self.channel.basic_publish(exchange, routing_key, body, props, mandatory=mandatory)
                return
            except px.UnroutableError as e:
                raise SagmqError(f"message to {exchange!r} with key {routing_key!r} was unroutable") from e
            except px.NackError as e:
                raise SagmqError(f"the broker refused a message to {exchange!r} ({routing_key!r})") from e
            except px.ChannelClosedByBroker as e:
                if e.reply_code not in (403, 406):
                    if attempt == 2:
                        raise
                    self._reconnect(e)
                    continue
                self._reconnect(e)  # the channel is gone: restore it and the consumers on it
                raise BrokerRefused(f"the broker refused a message to {exchange!r} with key {routing_key!r}: "
                                    f"{e.reply_code} {e.reply_text}") from e
            except _CONNECTION_ERRORS as e:
                if attempt == 2:
                    raise
                self._reconnect(e)

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
    ) -> None:
        """Publish like publish() (persistent, confirmed, mandatory; large arrays as parts) without
        waiting for the broker. Parts go out while fewer than SEND_WINDOW_PARTS are unconfirmed, so
        the service's loop keeps serving (admin requests, heartbeats) while a large model leaves.
        Small messages do not wait for each other (up to SEND_WINDOW_MESSAGES). on_done(None), or
        on_done(error) if the broker refused or could not route it, runs on this bus's thread once
        every part is confirmed. After a lost connection, whatever was not confirmed is sent again
        from its first part (receivers drop duplicate parts and duplicate messages). With
        retain=False the message is let go once its last part is out, before the confirms: one
        that a lost connection leaves unconfirmed then fails (on_done(error)) instead; for a sender
        that makes it again anyway (the aggregator rebuilds a round from its redelivered inputs)."""
        encoded = self._encode(msg, headers, cc, expiration_s=expiration_s)
        what = f"{msg.TYPE} to {exchange!r} ({routing_key!r})"
        self._sends.append(_Send(exchange, routing_key, encoded.bodies, True, on_done, what, retain=retain))
        self._pump_safe()

    @property
    def generation(self) -> int:
        """Counts connections: deliveries of an older generation can no longer be acked."""
        return self._generation

    @property
    def sending(self) -> int:
        """Sends not yet confirmed (or failed)."""
        return len(self._sends)

    def flush_sends(self, timeout_s: float) -> bool:
        """Serve I/O until every send is settled or timeout_s passes; True if none is left."""
        deadline = time.monotonic() + timeout_s
        while self._sends and time.monotonic() < deadline and self._conn is not None:
            self.process(min(0.05, max(0.0, deadline - time.monotonic())))
        return not self._sends

    def _pump_safe(self) -> None:
        try:
            self._pump()
        except _CONNECTION_ERRORS as e:  # the loop reconnects (and sends again) at its next process()
            self._lost = e

    def _pump(self) -> None:
        """Publish the next parts of pending sends, in order, while the window has room."""
        if self._conn is None:
            return
        window = SEND_WINDOW_PARTS * max(self.settings.chunk_bytes, 1)
        for snd in self._sends:
            if snd.all_sent or snd.error is not None:
                continue
            if snd.parts is None:
                snd.parts = snd.make_parts()
            while self._inflight_bytes < window and len(self._inflight) < SEND_WINDOW_MESSAGES:
                nxt = next(snd.parts, None)
                if nxt is None:
                    snd.all_sent = True
                    snd.parts = None
                    if not snd.retain:
                        snd.make_parts = _let_go  # the message (a whole model, maybe) can be freed now
                    if snd.unconfirmed == 0:
                        self._schedule_settle()
                    break
                body, props = nxt
                ch = self._sending_channel()
                ch._impl.basic_publish(snd.exchange, snd.routing_key, body, props, mandatory=snd.mandatory)
                self._send_seq += 1
                mid = props.message_id or ""
                n = len(body)
                self._inflight[self._send_seq] = (snd, n, mid)
                self._inflight_bytes += n
                snd.unconfirmed += 1
                self._by_message_id[mid] = snd
                del body, nxt
                if n < WRITE_WHOLE_BYTES:
                    self._write_now()
                else:  # a large part is written whole now: fewer, larger writes cost the broker less CPU
                    self._conn._flush_output()
            if not snd.all_sent:
                return  # the window is full: later sends wait their turn, keeping the order

    def _sending_channel(self) -> BlockingChannel:
        if self._send_ch is not None and self._send_ch.is_open:
            return self._send_ch
        assert self._conn is not None
        ch = self._conn.channel()
        ok: list[bool] = []
        ch._impl.add_on_return_callback(self._on_send_return)
        ch._impl.add_on_close_callback(self._on_send_channel_closed)
        ch._impl.confirm_delivery(ack_nack_callback=self._on_send_confirm, callback=lambda _f: ok.append(True))
        self._conn._flush_output(lambda: bool(ok))
        self._send_ch, self._send_seq = ch, 0
        return ch

    def _on_send_confirm(self, frame: Any) -> None:
        """(pika's I/O loop) an ack or nack for one send part, or for all up to a tag."""
        m = frame.method
        nack = isinstance(m, pika.spec.Basic.Nack)
        tags = [t for t in self._inflight if t <= m.delivery_tag] if m.multiple else [m.delivery_tag]
        for t in tags:
            item = self._inflight.pop(t, None)
            if item is None:
                continue
            snd, n, mid = item
            self._inflight_bytes -= n
            snd.unconfirmed -= 1
            if self._by_message_id.get(mid) is snd:
                del self._by_message_id[mid]
            if nack and snd.error is None:
                snd.error = SagmqError(f"the broker refused {snd.what} (nack)")
        self._schedule_settle()

    def _on_send_return(self, _ch: Any, method: Any, props: pika.BasicProperties, _body: bytes) -> None:
        """(pika's I/O loop) a mandatory send part no queue took; its ack follows."""
        snd = self._by_message_id.get(props.message_id or "")
        if snd is not None and snd.error is None:
            snd.error = SagmqError(f"{snd.what} was unroutable ({method.reply_code} {method.reply_text})")

    def _on_send_channel_closed(self, ch: Any, reason: BaseException) -> None:
        """(pika's I/O loop) the broker closed the sending channel (e.g. access refused, no such
        exchange): the sends in flight on it failed. A lost connection is not this: those are sent again."""
        if not isinstance(reason, px.ChannelClosedByBroker):
            return
        err = BrokerRefused(f"the broker closed the publishing channel: {reason.reply_code} {reason.reply_text}")
        for snd, _, _ in self._inflight.values():
            snd.unconfirmed -= 1
            if snd.error is None:
                snd.error = err
        self._inflight.clear()
        self._inflight_bytes = 0
        self._by_message_id.clear()
        self._send_ch = None
        self._schedule_settle()

    def _schedule_settle(self) -> None:
        if not self._settle_due and self._conn is not None:
            self._settle_due = True
            # runs outside pika's I/O callbacks, like a delivery; a timer, as this is the connection's own
            # thread (add_callback_threadsafe would wake the loop through its socket pair)
            self._conn.call_later(0, self._settle)

    def _settle(self) -> None:
        """Finish the sends that are confirmed or failed, then send more."""
        self._settle_due = False
        done = [x for x in self._sends if x.unconfirmed == 0 and (x.all_sent or x.error is not None)]
        for snd in done:
            self._sends.remove(snd)
            if snd.error is not None:
                log.error("%s", snd.error)
            if snd.on_done is not None:
                try:
                    snd.on_done(snd.error)
                except _CONNECTION_ERRORS:
                    raise
                except Exception:
                    log.exception("completing %s failed", snd.what)
        self._pump_safe()

    def _restart_sends(self) -> None:
        """On a new connection: whatever was not confirmed is sent again, from its first part."""
        self._send_ch, self._send_seq, self._settle_due = None, 0, False
        self._inflight.clear()
        self._inflight_bytes = 0
        self._by_message_id.clear()
        for snd in self._sends:
            if snd.error is None and snd.all_sent and snd.unconfirmed and not snd.retain:
                snd.error = SagmqError(f"{snd.what}: the connection was lost before the broker confirmed it "
                                       f"(not kept to send again)")
            elif snd.error is None and not (snd.all_sent and snd.unconfirmed == 0):
                snd.parts, snd.all_sent = None, False
            snd.unconfirmed = 0
        if self._sends:
            log.info("sending %d unconfirmed message(s) again", len(self._sends))
            self._schedule_settle()

    def reply(self, request: Delivery, msg: Message) -> None:
        """Answer an RPC request on its reply_to queue with its correlation_id."""
        if not request.reply_to:
            log.warning("request %s has no reply_to; reply dropped", request.message_id)
            return
        try:
            # Not mandatory: RabbitMQ 3.10 returns direct reply-to publishes as NO_ROUTE even when delivered.
            self.publish("", request.reply_to, msg, correlation_id=request.correlation_id, mandatory=False,
                         persistent=False)
        except SagmqError as e:  # the requester left; nothing else to do
            log.warning("reply to %s not delivered: %s", request.reply_to, e)

    # --- consuming ------------------------------------------------------------------

    def consume(self, queue: str, handler: Handler, prefetch: int = 16, stream: bool = False) -> None:
        """Deliver messages of a queue to handler, now and after every reconnect.

        Blob parts are assembled before the handler sees them, unless stream is set.
        """
        c = _Consumer(queue, handler, prefetch, stream)
        self._state.consumers.append(c)
        if self._ch is not None:
            self._start_consumer(c)

    def _start_consumer(self, c: _Consumer) -> None:
        ch = self.channel
        ch.basic_qos(prefetch_count=c.prefetch)
        ch.basic_consume(c.queue, lambda _ch, m, p, b: self._dispatch(c, m, p, b), auto_ack=False)

    def _dispatch(self, c: _Consumer, method: Any, props: pika.BasicProperties, body: bytes) -> None:
        d = Delivery(
            queue=c.queue,
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
            generation=self._generation,
        )
        if is_part(d.headers) and not c.stream:
            d = self._assemble(c, d)  # type: ignore[assignment]
            if d is None:
                return
        if d.message_id and d.message_id in self._poison:
            self.dead_letter(d, self._poison.pop(d.message_id))
            return
        try:
            c.handler(d)
        except (DecodeError, Rejected) as e:
            self.dead_letter(d, str(e))
            return
        except BrokerRefused as e:  # its channel was replaced: it comes back, and is dead-lettered then
            log.error("handling %s message %s: %s", d.msg_type, d.message_id, e)
            if d.message_id:
                self._poison[d.message_id] = f"handling it made the broker refuse an operation: {e}"
            return
        except _CONNECTION_ERRORS:
            raise
        except Exception as e:  # a handler bug must not kill the service
            log.exception("handler for %s failed on %s message", c.queue, d.msg_type)
            self.dead_letter(d, f"internal error: {type(e).__name__}: {e}")
            return
        if not d.deferred:
            self.ack(d)

    def _assemble(self, c: _Consumer, d: Delivery) -> Delivery | None:
        """Add a blob part; return the whole message once every part is in."""
        try:
            blob, idx, n, size = part_info(d.headers)
        except DecodeError as e:
            self.dead_letter(d, str(e))
            return None
        if blob in self._refused_blobs:
            self.ack(d)  # the rest of a blob already dead-lettered with its reason
            return None
        key = (c.queue, blob)
        if key not in self._assemblies:
            self._assemblies[key] = (Assembly(blob, n, size, self.settings.max_model_bytes), [])
        asm, held = self._assemblies[key]
        held.append(d)
        try:
            done = asm.add(idx, d.headers, d.body, self.settings.max_body_bytes)
        except DecodeError as e:
            self._refuse_blob(key, f"blob part {idx} of {n}: {e}")
            return None
        if idx > 0 and idx in asm.got:
            d.body = b""  # copied into the assembly: hold only the delivery tag
        if not done:
            return None
        del self._assemblies[key]
        first = next(p for p in held if p.headers.get("x-sagmq-part") == 0)
        return Delivery(first.queue, first.exchange, first.routing_key, first.msg_type, first.headers,
                        first.user_id, first.message_id, first.correlation_id, first.reply_to,
                        any(p.redelivered for p in held), first.body, first.tag, first.generation,
                        payload=asm.message_map(), parts=held)

    def _refuse_blob(self, key: tuple[str, str], reason: str) -> None:
        """Dead-letter a blob (its first held part carries the reason) and drop the rest of it."""
        _, held = self._assemblies.pop(key)
        self._refused_blobs[key[1]] = time.monotonic()
        first = next((p for p in held if p.headers.get("x-sagmq-part") == 0), held[0])
        self.dead_letter(first, reason)
        for p in held:
            if p is not first:
                self.ack(p)

    def expire_blobs(self) -> None:
        """Dead-letter blobs whose missing parts did not come within chunk_timeout_s."""
        now = time.monotonic()
        for key, (asm, _) in list(self._assemblies.items()):
            if now - asm.last_seen > self.settings.chunk_timeout_s:
                self._refuse_blob(key, f"incomplete blob {asm.blob}: parts {asm.missing()[:10]} of {asm.parts} "
                                       f"missing after {self.settings.chunk_timeout_s:g} s")
        for blob, t in list(self._refused_blobs.items()):
            if now - t > 10 * self.settings.chunk_timeout_s:
                del self._refused_blobs[blob]

    def requeue(self, d: Delivery) -> None:
        """Give a delivery back to its queue, to come again (for something that is not ready yet)."""
        d.deferred = True
        if d.generation == self._generation and self._ch is not None:
            self._ch.basic_nack(d.tag, requeue=True)

    def ack_many(self, deliveries: list[Delivery]) -> None:
        """Ack deliveries that were held (deferred) until their effect was durable."""
        for d in deliveries:
            self.ack(d)

    def ack(self, d: Delivery) -> None:
        """Ack a delivery on the channel it came from (skipped if that channel is gone)."""
        if d.parts:
            for p in d.parts:
                self.ack(p)
            return
        if d.generation != self._generation or self._ch is None:
            log.debug("not acking %s: its channel was replaced (the broker redelivers it)", d.message_id)
            return
        self._ch._impl.basic_ack(d.tag)
        self._write_now()

    def _write_now(self) -> None:
        """Write the frames pika has buffered now, with one sendmsg, instead of by a turn of its I/O loop
        (a poll and its timers: for a small message, a good part of what a publish or an ack costs).
        What the socket does not take now, and any socket error, is left to the loop: it keeps writing
        once the socket can take more, and handles errors as before."""
        conn = self._conn
        t = conn._impl._transport if conn is not None else None
        if t is None or not t._tx_buffers or t._state != t._STATE_ACTIVE:
            return
        if isinstance(t._sock, ssl.SSLSocket):
            conn._flush_output()
            return
        try:
            _produce_gathered(t)
        except OSError:
            return
        if not t._tx_buffers:
            t._nbio.remove_writer(t._sock.fileno())

    def dead_letter(self, d: Delivery, reason: str) -> None:
        """Log the reason, copy the message to P.dead with it, then ack the original."""
        self.dead_lettered += 1
        log.warning(
            "dead-lettering %s message from queue %s (user %s, job %s, round %s, site %s): %s",
            d.msg_type or "untyped",
            d.queue,
            d.user_id,
            d.header_str("job_id"),
            d.header_str("round"),
            d.header_str("site"),
            reason,
        )
        headers = {k: v for k, v in d.headers.items() if k != "CC" and k != H_BLOB}
        headers.update(
            {
                "x-sagmq-reason": reason[:2000],
                "x-sagmq-queue": d.queue,
                "x-sagmq-routing-key": d.routing_key,
                "x-sagmq-original-type": d.msg_type,
                "x-sagmq-original-user": d.user_id or "",
                "x-sagmq-original-message-id": d.message_id or "",
                "x-sagmq-dead-at": int(time.time() * 1000),  # AMQP tables take no floats
            }
        )
        props = self.properties("dead", headers)
        try:
            self.publish_raw(self.names.dead, "", d.body, props)
        except _CONNECTION_ERRORS:
            raise
        except Exception:  # never lose the message: let the queue's own DLX take it, reason logged above
            log.exception("could not copy the message to %s; rejecting it to the queue's dead-letter exchange",
                          self.names.dead)
            for p in d.parts or [d]:
                if p.generation == self._generation and self._ch is not None:
                    self._ch.basic_nack(p.tag, requeue=False)
            return
        self.ack(d)

    # --- running --------------------------------------------------------------------

    def process(self, time_limit: float) -> None:
        """Serve I/O (deliveries, heartbeats, thread-safe callbacks) for up to time_limit s."""
        try:
            if self._conn is None:
                raise px.AMQPConnectionError("not connected")
            if self._lost is not None:
                lost, self._lost = self._lost, None
                raise lost
            self._pump()
            self._conn.process_data_events(time_limit=time_limit)
            if self._ch is None or not self._ch.is_open:
                # the broker closed our channel (e.g. a delivery held past consumer_timeout):
                # pika says nothing until the channel is next used, so look
                raise px.ChannelClosed(0, "the broker closed the channel")
        except _CONNECTION_ERRORS as e:
            self._reconnect(e)
        if self._reset_pending:
            why, self._reset_pending = self._reset_pending, ""
            self._reconnect(SagmqError(why))

    def run(self, stop: threading.Event, tick: Callable[[], None] | None = None, tick_s: float = 0.1) -> None:
        """Serve until stop is set, calling tick every tick_s seconds."""
        next_tick = time.monotonic()
        while not stop.is_set():
            self.process(tick_s)
            if self._assemblies:
                self.expire_blobs()
            if tick is not None and time.monotonic() >= next_tick:
                try:
                    tick()
                except _CONNECTION_ERRORS as e:
                    self._reconnect(e)
                except SagmqError as e:  # e.g. a publish the broker refused; try again next tick
                    log.error("%s", e)
                next_tick = time.monotonic() + tick_s

    def call_threadsafe(self, fn: Callable[[], None]) -> None:
        """Run fn on the bus's own thread at its next process() (the only cross-thread call)."""
        if self._conn is None:
            raise SagmqError("the bus is not connected")
        self._conn.add_callback_threadsafe(fn)

    def browse(self, queue: str, limit: int = 1000) -> list[Delivery]:
        """Read up to limit messages of a queue without removing them (they are requeued in order)."""
        if self._conn is None:
            raise SagmqError("the bus is not connected")
        ch = self._conn.channel()
        out: list[Delivery] = []
        try:
            while len(out) < limit:
                method, props, body = ch.basic_get(queue, auto_ack=False)
                if method is None:
                    break
                out.append(Delivery(queue, method.exchange, method.routing_key, props.type or "",
                                    dict(props.headers or {}), props.user_id, props.message_id,
                                    props.correlation_id, props.reply_to, bool(method.redelivered), body,
                                    method.delivery_tag, self._generation))
        finally:
            ch.close()  # closing without acks puts every message back
        return out

    # --- RPC ------------------------------------------------------------------------

    def rpc(self, exchange: str, routing_key: str, msg: Message, timeout_s: float) -> Delivery:
        """Send a request and wait for its reply over direct reply-to; retried once after a lost connection."""
        try:
            return self._rpc_once(exchange, routing_key, msg, timeout_s)
        except _CONNECTION_ERRORS as e:
            self._reconnect(e)
            return self._rpc_once(exchange, routing_key, msg, timeout_s)

    def _rpc_once(self, exchange: str, routing_key: str, msg: Message, timeout_s: float) -> Delivery:
        ch = self.channel
        corr = uuid.uuid4().hex
        box: list[Delivery] = []
        asm: list[Assembly] = []

        def on_reply(_ch: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
            if props.correlation_id != corr:
                return
            headers = dict(props.headers or {})
            d = Delivery("amq.rabbitmq.reply-to", method.exchange, method.routing_key, props.type or "", headers,
                         props.user_id, props.message_id, props.correlation_id, None, False, body, 0,
                         self._generation)
            if not is_part(headers):
                box.append(d)
                return
            blob, idx, n, size = part_info(headers)  # a large reply (a download) comes in parts
            if not asm:
                asm.append(Assembly(blob, n, size, self.settings.max_model_bytes))
            if asm[0].add(idx, headers, body, self.settings.max_body_bytes):
                d.payload = asm[0].message_map()
                box.append(d)

        tag = ch.basic_consume("amq.rabbitmq.reply-to", on_reply, auto_ack=True)
        try:
            self.publish(exchange, routing_key, msg, reply_to="amq.rabbitmq.reply-to",
                         correlation_id=corr, expiration_s=timeout_s)
            deadline = time.monotonic() + timeout_s
            while not box:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RpcTimeout(f"no reply to {msg.TYPE} {routing_key!r} within {timeout_s:g} s")
                assert self._conn is not None
                self._conn.process_data_events(time_limit=min(left, 0.2))
        finally:
            if self._ch is not None and self._ch.is_open:
                try:
                    self._ch.basic_cancel(tag)
                except _CONNECTION_ERRORS:
                    pass
        return box[0]


def delete_topology(bus: AmqpBus, topo: Topology) -> None:
    """Delete a topology's queues and exchanges (tests and `sagmq poc` clean up with it)."""
    bus.delete(topo)
