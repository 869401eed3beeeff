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
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlparse

import pika
import pika.exceptions as px
from pika.adapters.utils import connection_workflow as cw
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_exponential, wait_random

from sagmq.wire.errors import BrokerUnavailable
from sagmq.wire.settings import Settings

log = logging.getLogger(__name__)
logging.getLogger("tenacity").setLevel(logging.ERROR)  # sagmq says itself what it retries, in one line

AUTH_ERRORS = (px.ProbableAuthenticationError, px.ProbableAccessDeniedError, px.AuthenticationError)


class ConnectionLost(px.AMQPConnectionError):  # type: ignore[misc]  # pika's classes are untyped
    """The connection, or a channel the bus cannot do without, was closed under us."""


# What throws the connection away and rebuilds it: failures of the link, never a handler's own error.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (px.AMQPConnectionError, px.StreamLostError,
                                                      px.ConnectionWrongStateError, px.ChannelWrongStateError)


def parameters(settings: Settings, service: str, heartbeat: bool = True) -> Any:
    """Connection parameters from the settings (TLS when the URL is amqps://); a list of them, to try in
    turn, when SAGMQ_AMQP_URL names several brokers (pika's BlockingConnection takes a list, Link too)."""
    many = [_parameters(settings, url, service, heartbeat) for url in settings.amqp_urls]
    return many if len(many) > 1 else many[0]


def _parameters(settings: Settings, url: str, service: str, heartbeat: bool) -> pika.URLParameters:
    s = settings
    p = pika.URLParameters(url)
    p.heartbeat = s.amqp_heartbeat_s if heartbeat else 0
    p.blocked_connection_timeout = 300
    p.client_properties = {"connection_name": f"sagmq-{service}"}
    if url.startswith("amqps://"):
        ctx = ssl.create_default_context(cafile=s.tls_ca_file or None)
        if s.tls_cert_file:
            ctx.load_cert_chain(s.tls_cert_file, s.tls_key_file or None)
        p.ssl_options = pika.SSLOptions(ctx, s.tls_server_name or p.host)
    return p


def safe_url(url: str) -> str:
    """The URL without its credentials, for logs and errors (each URL of a comma-separated list)."""
    if "," in url:
        return ",".join(safe_url(u.strip()) for u in url.split(",") if u.strip())
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def tls_failure(e: BaseException) -> bool:
    """A TLS handshake refusal (pika keeps TLS 1.3's late alert only as text)."""
    return isinstance(e, ssl.SSLError) or "SSLError(" in str(e)


def retryable(e: BaseException) -> bool:
    """Worth another try: the broker is unreachable, not refusing us."""
    # a handshake that times out (a black-holed network) surfaces as pika's connector errors
    # a host name that does not resolve yet (a container not started yet) is retried too
    lost = isinstance(e, px.AMQPConnectionError | cw.AMQPConnectorException | socket.gaierror)
    return lost and not isinstance(e, AUTH_ERRORS) and not tls_failure(e)


def _causes(e: BaseException) -> list[BaseException]:
    """e and what it wraps (pika nests the socket's error in args, .exceptions, .exception)."""
    seen: list[BaseException] = []
    todo: list[Any] = [e]
    while todo and len(seen) < 20:
        x = todo.pop(0)
        if not isinstance(x, BaseException) or any(x is s for s in seen):
            continue
        seen.append(x)
        todo += [*x.args, *(getattr(x, "exceptions", None) or []), getattr(x, "exception", None), x.__cause__]
    return seen


def _where(url: str) -> tuple[str, str, str]:
    """host:port (each of a comma-separated list), user and vhost of an AMQP URL."""
    urls = [urlparse(x.strip()) for x in url.split(",") if x.strip()] or [urlparse(url)]
    addr = ", ".join(f"{u.hostname or 'localhost'}:{u.port or (5671 if u.scheme == 'amqps' else 5672)}" for u in urls)
    u = urls[0]
    vhost = unquote(u.path[1:]) if len(u.path) > 1 else "/"
    return addr, unquote(u.username or "guest"), vhost


def explain(url: str, e: BaseException) -> tuple[str, str]:
    """Why a connection attempt failed, in words, and the fix that fits the cause."""
    addr, user, vhost = _where(url)
    causes = _causes(e)
    text = " ".join(str(c) for c in causes)
    if isinstance(e, px.ProbableAccessDeniedError) or "NOT_ALLOWED" in text:
        if "not found" in text:
            return (f"vhost {vhost!r} does not exist on the broker at {addr}",
                    f"create it (`rabbitmqctl add_vhost {vhost}` and set_permissions for {user}) "
                    "or correct the vhost at the end of SAGMQ_AMQP_URL")
        return (f"user {user!r} may not use vhost {vhost!r} at {addr}",
                f"grant it (`rabbitmqctl set_permissions -p {vhost} {user} ...`) or correct SAGMQ_AMQP_URL")
    if isinstance(e, AUTH_ERRORS) or "ACCESS_REFUSED" in text:
        return (f"the broker at {addr} refused the credentials of user {user!r} (403 ACCESS_REFUSED)",
                "check the user and password in SAGMQ_AMQP_URL (amqp://USER:PASSWORD@host:port/vhost)")
    if any(isinstance(c, ssl.SSLError) for c in causes) or tls_failure(e):
        return (f"TLS handshake with {addr} failed: {next((c for c in causes if isinstance(c, ssl.SSLError)), e)}",
                "check SAGMQ_TLS_CA_FILE (the CA that signed the broker's certificate), SAGMQ_TLS_CERT_FILE and "
                "SAGMQ_TLS_KEY_FILE (a client certificate the broker trusts) and SAGMQ_TLS_SERVER_NAME")
    for c in causes:
        if isinstance(c, ConnectionRefusedError):
            return (f"connection refused at {addr}",
                    f"is a RabbitMQ broker running at {addr}? Start one (`rabbitmq-server -detached` or "
                    "`docker compose up -d rabbitmq`) or point SAGMQ_AMQP_URL at yours")
        if isinstance(c, socket.gaierror):
            return (f"cannot resolve the host of {addr} ({c.strerror})", "check the host name in SAGMQ_AMQP_URL")
        if isinstance(c, TimeoutError | socket.timeout) or "timed out" in str(c).lower():
            return (f"no answer from {addr} (timed out)",
                    "check the host and port in SAGMQ_AMQP_URL, and that no firewall drops the connection")
        if isinstance(c, OSError) and c.strerror:
            return (f"{c.strerror.lower()} at {addr}", "check the host and port in SAGMQ_AMQP_URL")
    detail = next((str(c) for c in reversed(causes) if str(c)), type(e).__name__)
    return (f"{type(e).__name__} at {addr}: {detail}", "check SAGMQ_AMQP_URL and the broker's log")


def unavailable(url: str, e: BaseException) -> BrokerUnavailable:
    """The error a failed connect becomes: the reason, and the fix as its hint."""
    reason, hint = explain(url, e)
    return BrokerUnavailable(safe_url(url), reason, hint)


def _capped_wait(deadline: float) -> Callable[[RetryCallState], float]:
    """Exponential backoff with jitter, never sleeping past the deadline (so a CLI fails within its time)."""
    backoff = wait_exponential(multiplier=0.2, max=2) + wait_random(0, 0.5)

    def wait(state: RetryCallState) -> float:
        return max(0.0, min(backoff(state), deadline - time.monotonic()))
    return wait


def _say_retry(url: str) -> Callable[[RetryCallState], None]:
    """One line per retry: what is tried, why it failed, when the next try comes."""
    def before_sleep(state: RetryCallState) -> None:
        e = state.outcome.exception() if state.outcome is not None else None
        why = explain(url, e)[0] if e is not None else "unknown"
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning("connecting to RabbitMQ at %s: %s; trying again in %.1f s", safe_url(url), why, wait)
    return before_sleep


def with_retry(fn: Callable[[], None], timeout_s: float, url: str) -> None:
    """Run fn, again while it fails with a connection error, for up to timeout_s. The wait grows to at
    most 2-2.5 s: after a broker restart every site is back within that of the broker, well inside
    the grace the server gives silent sites (SAGMQ_CLIENT_TIMEOUT_S, 10 s)."""
    retrying = Retrying(
        retry=retry_if_exception(retryable),
        wait=_capped_wait(time.monotonic() + timeout_s),
        stop=stop_after_delay(timeout_s),
        before_sleep=_say_retry(url),
        reraise=True,
    )
    try:
        retrying(fn)
    except (px.AMQPError, cw.AMQPConnectorException, ssl.SSLError, OSError) as e:
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

    def __init__(self, params: Any) -> None:
        self.conn: Any = None
        self.lost: BaseException | None = None  # why the connection closed, if it did
        self._opened = False
        # several brokers (a cluster's nodes): open() tries them in turn, the first that answers wins
        self._next = list(params) if isinstance(params, list | tuple) else [params]
        self._start(self._next.pop(0))

    def _start(self, params: pika.URLParameters) -> None:
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
                if not self._next or not retryable(self.lost):
                    raise self.lost
                log.info("broker %s:%s did not answer (%s); trying the next", self.conn.params.host,
                         self.conn.params.port, self.lost)
                self.lost = None
                self._start(self._next.pop(0))
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
