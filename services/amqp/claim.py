"""Site names that survive restarts: a site holds its name by an exclusive queue ``P.claim.<site>``.

With ``SAGMQ_SITE=site-{n}`` a client claims the lowest free number n >= 1: it declares the
exclusive queue ``P.claim.site-<n>`` on a connection of its own, and a name another process holds
answers 405 RESOURCE_LOCKED, so it tries n+1. The broker deletes an exclusive queue with its
connection, so a site that dies (or a container that restarts) frees its name, and the next site to
start takes the lowest free one, with the durable queue ``P.site.<name>`` and what waits in it.

The claim's connection is kept by a thread of its own (pika's BlockingConnection, heartbeats on).
When it is lost, the thread reconnects and claims the same name again; if another process took it
meanwhile, the site must stop: the thread logs why and calls ``on_lost`` (the client sets its stop
event and exits non-zero, so a supervisor starts it again under a free name).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pika.exceptions as px

from sagmq.amqp.bus import open_blocking
from sagmq.amqp.connection import AUTH_ERRORS, parameters, with_retry
from sagmq.wire.errors import BrokerRefused, BrokerUnavailable
from sagmq.wire.settings import SITE_NUMBER, Settings, check_name
from sagmq.wire.topology import Names

log = logging.getLogger(__name__)

RESOURCE_LOCKED = 405
MAX_NUMBER = 100_000


class SiteClaim:
    """One site name held by an exclusive queue on a connection of this object's own."""

    def __init__(self, settings: Settings, service: str = "client", connect_timeout_s: float = 300.0) -> None:
        self.settings = settings
        self.names = Names(settings.prefix)
        self.service = service
        self.connect_timeout_s = connect_timeout_s  # at start: as long as the bus waits for its broker
        self.name = ""
        self.lost = False  # another process took the name while the connection was down
        self._conn: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _connect(self, timeout_s: float) -> None:
        """Connect, retrying connection errors for up to timeout_s (a broker still starting), as the bus does."""
        def once() -> None:
            # each URL in turn: a killed cluster node's name stops resolving (see bus.open_blocking)
            self._conn = open_blocking(parameters(self.settings, f"{self.service}-claim"))

        try:
            with_retry(once, timeout_s, self.settings.amqp_url)
        except BrokerUnavailable as e:
            if isinstance(e.__cause__, AUTH_ERRORS):  # the line serve() logs for the bus's own connection
                log.error("the broker refused user %s: check SAGMQ_AMQP_URL (%s)", self.settings.amqp_user, e.reason)
            raise

    def try_name(self, name: str) -> bool:
        """Declare name's claim queue; False if another connection holds it."""
        ch = self._conn.channel()
        try:
            ch.queue_declare(self.names.claim_queue(name), exclusive=True, arguments={"x-queue-type": "classic"})
        except px.ChannelClosedByBroker as e:
            if e.reply_code == RESOURCE_LOCKED:
                return False
            raise BrokerRefused(f"the broker refused the site name claim {self.names.claim_queue(name)!r}: "
                                f"{e.reply_code} {e.reply_text}") from e
        if ch.is_open:
            ch.close()  # the queue belongs to the connection, not to the channel
        return True

    def claim(self, template: str) -> str:
        """Claim template with {n} = the lowest free number >= 1 (or template itself if it has no {n})."""
        if self._conn is None:
            self._connect(self.connect_timeout_s)
        candidates = (template.replace(SITE_NUMBER, str(n)) for n in range(1, MAX_NUMBER)) \
            if SITE_NUMBER in template else iter((template,))
        for name in candidates:
            check_name("site", name)
            if self.try_name(name):
                self.name = name
                log.info("site name %s claimed (%s)", name, self.names.claim_queue(name))
                return name
            log.debug("site name %s is taken", name)
        raise BrokerRefused(f"no free site name for {template!r}: every one is held by another site")

    def watch(self, on_lost: Callable[[], None]) -> None:
        """Keep the claim from a thread: heartbeats, and claiming the name again after a lost connection."""
        self._thread = threading.Thread(target=self._run, args=(on_lost,), name="site-claim", daemon=True)
        self._thread.start()

    def _run(self, on_lost: Callable[[], None]) -> None:
        while not self._stop.is_set():
            try:
                if self._conn is None or not self._conn.is_open:
                    self._reclaim()
                    if self.lost:
                        on_lost()
                        return
                self._conn.process_data_events(time_limit=1.0)
            except Exception as e:  # a lost connection, a broker that is down: try again in a second
                log.warning("site name claim %s: connection lost (%s); claiming it again", self.name, e,
                            extra={"rate_kind": "site claim"})
                self._drop()
                self._stop.wait(1.0)
        self._drop()

    def _reclaim(self) -> None:
        self._drop()
        self._connect(5.0)  # (then again from _run's loop, a second later)
        if self.try_name(self.name):
            log.info("site name %s claimed again after a lost connection", self.name)
            return
        self.lost = True
        log.error("site name %s was taken by another site while the connection was down: stopping (a supervisor "
                  "restarts this site under a free name)", self.name)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                if conn.is_open:
                    conn.close()
            except Exception as e:  # closing a broken connection
                log.debug("closing the claim connection: %r", e)

    def close(self) -> None:
        """Give the name up (the queue goes with the connection)."""
        self._stop.set()
        if self._thread is not None and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        else:
            self._drop()
