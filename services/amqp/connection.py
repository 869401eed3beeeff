"""One connection to RabbitMQ on pika's asynchronous adapter, driven from its owner's thread.

``Link`` opens a ``pika.SelectConnection`` and turns its I/O loop by hand with the loop's
public ``poll()`` and ``process_timeouts()``, a ``call_later`` timer bounding each wait. pika's
callbacks only record what happened (the bus's own code runs after the turn, never inside
one), so a wait for one answer (a declare, a confirm) can be written as "turn until it came".
Connecting retries connection errors with jittered backoff (tenacity), but not refused
credentials or a refused TLS handshake: those fail at once with ``BrokerUnavailable``.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions as px
from pika.adapters.utils import connection_workflow as cw
from tenacity import Retrying, before_sleep_log, retry_if_exception, stop_after_delay, wait_exponential, wait_random

from sagmq.wire.errors import BrokerUnavailable
from sagmq.wire.settings import Settings

log = logging.getLogger(__name__)

AUTH_ERRORS = (px.ProbableAuthenticationError, px.ProbableAccessDeniedError, px.AuthenticationError)


class ConnectionLost(px.AMQPConnectionError):  # type: ignore[misc]  # pika's classes are untyped
    """The connection, or a channel the bus cannot do without, was closed under us."""


# What throws the connection away and rebuilds it: failures of the link, never a handler's own error.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (px.AMQPConnectionError, px.StreamLostError,
                                                      px.ConnectionWrongStateError, px.ChannelWrongStateError)


def parameters(settings: Settings, service: str, heartbeat: bool = True) -> pika.URLParameters:
    """Connection parameters from the settings (TLS when the URL is amqps://)."""
    s = settings
    p = pika.URLParameters(s.amqp_url)
    p.heartbeat = s.amqp_heartbeat_s if heartbeat else 0
    p.blocked_connection_timeout = 300
    p.client_properties = {"connection_name": f"sagmq-{service}"}
    if s.amqp_url.startswith("amqps://"):
        ctx = ssl.create_default_context(cafile=s.tls_ca_file or None)
        if s.tls_cert_file:
            ctx.load_cert_chain(s.tls_cert_file, s.tls_key_file or None)
        p.ssl_options = pika.SSLOptions(ctx, s.tls_server_name or p.host)
    return p


def safe_url(url: str) -> str:
    """The URL without its credentials, for logs and errors."""
    if "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def tls_failure(e: BaseException) -> bool:
    """A TLS handshake refusal (pika keeps TLS 1.3's late alert only as text)."""
    return isinstance(e, ssl.SSLError) or "SSLError(" in str(e)


def retryable(e: BaseException) -> bool:
    """Worth another try: the broker is unreachable, not refusing us."""
    # a handshake that times out (a black-holed network) surfaces as pika's connector errors
    lost = isinstance(e, px.AMQPConnectionError | cw.AMQPConnectorException)
    return lost and not isinstance(e, AUTH_ERRORS) and not tls_failure(e)


def unavailable(url: str, e: BaseException) -> BrokerUnavailable:
    """The error a failed connect becomes."""
    where = safe_url(url)
    if isinstance(e, AUTH_ERRORS):
        return BrokerUnavailable(where, f"the broker refused the credentials ({e!r})")
    if isinstance(e, ssl.SSLError):
        return BrokerUnavailable(where, f"TLS handshake failed: {e}")
    if tls_failure(e):
        return BrokerUnavailable(where, f"the broker refused TLS (client certificate missing or untrusted?): {e}")
    return BrokerUnavailable(where, f"{type(e).__name__}: {e}")


def with_retry(fn: Callable[[], None], timeout_s: float, url: str) -> None:
    """Run fn, again while it fails with a connection error, for up to timeout_s. The wait grows to at
    most 2-2.5 s: after a broker restart every site is back within that of the broker, well inside
    the grace the server gives silent sites (SAGMQ_CLIENT_TIMEOUT_S, 10 s)."""
    retrying = Retrying(
        retry=retry_if_exception(retryable),
        wait=wait_exponential(multiplier=0.2, max=2) + wait_random(0, 0.5),
        stop=stop_after_delay(timeout_s),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )
    try:
        retrying(fn)
    except (px.AMQPError, cw.AMQPConnectorException, ssl.SSLError) as e:
        raise unavailable(url, e) from e


def open_error(e: BaseException) -> BaseException:
    """The error of the last connection attempt, as BlockingConnection would raise it."""
    last: BaseException = e
    if isinstance(e, cw.AMQPConnectionWorkflowFailed) and e.exceptions:
        last = e.exceptions[-1]
        if isinstance(last, cw.AMQPConnectorSocketConnectError):
            last = px.AMQPConnectionError(last)
        elif isinstance(last, cw.AMQPConnectorPhaseErrorBase):
            last = last.exception
    return last


class Link:
    """A SelectConnection and its I/O loop, turned from the owner's thread."""

    def __init__(self, params: pika.URLParameters) -> None:
        self.conn: Any = None
        self.lost: BaseException | None = None  # why the connection closed, if it did
        self._opened = False
        self.conn = pika.SelectConnection(params, on_open_callback=self._on_open,
                                          on_open_error_callback=self._on_open_error,
                                          on_close_callback=self._on_close)
        # what ioloop.start() does before its loop of poll() and process_timeouts(), which turn() does
        self.conn.ioloop.activate_poller()

    def _on_open(self, _conn: Any) -> None:
        self._opened = True

    def _on_open_error(self, _conn: Any, e: BaseException) -> None:
        self.lost = open_error(e)

    def _on_close(self, _conn: Any, reason: BaseException) -> None:
        self.lost = reason if isinstance(reason, BaseException) else ConnectionLost(str(reason))

    @property
    def ioloop(self) -> Any:
        """The connection's own I/O loop."""
        return self.conn.ioloop

    def open(self) -> Link:
        """Turn the loop until the connection is open; raise what the attempt failed with."""
        while not self._opened:
            self.turn(1.0)
            if self.lost is not None:
                self.shut()
                raise self.lost
        return self

    def turn(self, timeout_s: float) -> None:
        """One turn of the I/O loop: wait up to timeout_s for I/O or a timer, then run what is due."""
        loop = self.conn.ioloop
        timer = loop.call_later(max(0.0, timeout_s), _nothing)
        try:
            loop.poll()
            loop.process_timeouts()
        finally:
            loop.remove_timeout(timer)

    def check(self) -> None:
        """Raise ConnectionLost if the connection closed."""
        if self.lost is not None or not self.conn.is_open:
            raise ConnectionLost(f"the connection was lost: {self.lost!r}")

    def wait(self, done: Callable[[], bool], timeout_s: float, what: str,
             between: Callable[[], None] | None = None) -> None:
        """Turn the loop until done() (raise ConnectionLost if the connection closes first)."""
        deadline = time.monotonic() + timeout_s
        while not done():
            self.check()
            left = deadline - time.monotonic()
            if left <= 0:  # a broker that stops answering is a lost connection: rebuild it
                self.lost = ConnectionLost(f"no answer from the broker to {what} within {timeout_s:g} s")
                raise self.lost
            self.turn(min(left, 1.0))
            if between is not None:
                between()

    def channel(self, confirm: Callable[[Any], None] | None = None,
                on_return: Callable[[Any, Any, Any, bytes], None] | None = None,
                on_close: Callable[[BaseException], None] | None = None) -> Channel:
        """Open a channel and wait until it is open (and in confirm mode when confirm is given)."""
        return Channel(self, confirm, on_return, on_close)

    def shut(self, timeout_s: float = 2.0) -> None:
        """Close the connection (politely if it is open, for up to timeout_s) and the loop's sockets."""
        try:
            if self.conn.is_open:
                self.conn.close()
            deadline = time.monotonic() + timeout_s
            while not self.conn.is_closed and time.monotonic() < deadline:
                self.turn(0.1)
        except Exception as e:  # closing a broken connection may fail in many ways
            log.debug("closing the connection: %r", e)
        try:
            self.conn.ioloop.deactivate_poller()
            self.conn.ioloop.close()
        except Exception as e:
            log.debug("closing the I/O loop: %r", e)


class Channel:
    """A pika channel of a Link, with why it closed (if it did) and blocking calls on it."""

    def __init__(self, link: Link, confirm: Callable[[Any], None] | None,
                 on_return: Callable[[Any, Any, Any, bytes], None] | None,
                 on_close: Callable[[BaseException], None] | None) -> None:
        self.link = link
        self.closed: BaseException | None = None
        self._on_close = on_close
        opened: list[Any] = []
        self.ch: Any = link.conn.channel(on_open_callback=opened.append)
        self.ch.add_on_close_callback(self._closed)
        link.wait(lambda: bool(opened) or self.closed is not None, 30, "opening a channel")
        self.raise_if_closed()
        if on_return is not None:
            self.ch.add_on_return_callback(on_return)
        if confirm is not None:
            self.call(lambda cb: self.ch.confirm_delivery(ack_nack_callback=confirm, callback=cb),
                      "Confirm.Select")

    def _closed(self, _ch: Any, reason: BaseException) -> None:
        self.closed = reason
        if self._on_close is not None:
            self._on_close(reason)

    @property
    def is_open(self) -> bool:
        """Open, and its connection too."""
        return self.closed is None and bool(self.ch.is_open) and self.link.lost is None

    def raise_if_closed(self) -> None:
        """Raise why the channel closed (the broker's ChannelClosedByBroker, or the lost connection)."""
        if self.closed is not None:
            if isinstance(self.closed, px.ChannelClosedByBroker):
                raise self.closed
            raise ConnectionLost(f"the channel closed: {self.closed!r}")
        self.link.check()

    def sync(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call a pika channel method that answers through its callback argument, and wait for it."""
        method = getattr(self.ch, name)
        return self.call(lambda cb: method(*args, callback=cb, **kwargs), name)

    def call(self, op: Callable[[Callable[[Any], None]], None], what: str, timeout_s: float = 60.0) -> Any:
        """Start an operation that answers through a callback (op gets it) and wait for the answer."""
        box: list[Any] = []
        op(box.append)
        self.link.wait(lambda: bool(box) or self.closed is not None, timeout_s, what)
        if not box:
            self.raise_if_closed()
        return box[0]


def _nothing() -> None:
    """A timer's callback that only bounds a wait."""
