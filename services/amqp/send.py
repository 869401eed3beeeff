"""Confirmed publishes that do not wait (``Bus.send``): a window of parts in flight, settled by
the broker's confirms, in order, sent again after a lost connection, and sent again after a pause
when the broker refuses them (a nack: a quorum queue whose leader was on a node that just failed
refuses publishes until its members elect another, which takes seconds; the sends behind it wait,
so the order holds).

The sends have a confirm-mode channel of their own. pika's callbacks only count: a confirm,
a return or the channel's closing updates the bookkeeping and marks the sender due; the bus
then calls ``settle()`` at top level, where ``on_done`` runs and the next parts go out.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions as px

from sagmq.amqp.connection import Channel
from sagmq.amqp.publish import Bodies
from sagmq.wire.bus import Done
from sagmq.wire.errors import BrokerRefused, SagmqError
from sagmq.wire.settings import Settings

log = logging.getLogger(__name__)

# At most this many parts (of the chunk size) or messages unconfirmed at once. One part: the
# broker is the bottleneck for large models, and at 8 sites x 200 MB a window of 2 or 6 parts
# made the aggregate's trip no faster (2.7 s and 4.3-4.9 s against 2.5-2.8 s) while the sender held
# more of it (the aggregator peaked at 349-475 MB against 284 MB)
SEND_WINDOW_PARTS = 1
SEND_WINDOW_MESSAGES = 256
# A refused (nacked) send goes again after 0.5, 1, 2, 4 s and then every 5 s: about a minute in all
# before its on_done gets the error. (A cluster node killed mid-job left quorum queues refusing
# publishes for up to 30 s here; a site's result refused once was lost for good.)
NACK_RETRIES = 14
NACK_PAUSE_S = 0.5
NACK_PAUSE_MAX_S = 5.0
# After this many refusals in a row (and every so many more) the bus opens a new connection: RabbitMQ
# 3.10 kept refusing one site's publishes to a quorum queue for over a minute on the channel it had
# used before the leader moved, while a new channel's went through at once.
NACK_REOPEN_EVERY = 2


@dataclass(slots=True)
class Send:
    """One message handed to send(): its parts are made lazily and published as the window allows."""

    exchange: str
    routing_key: str
    make_parts: Bodies
    mandatory: bool
    on_done: Done | None
    what: str
    parts: Iterator[tuple[bytes, pika.BasicProperties]] | None = None
    all_sent: bool = False
    unconfirmed: int = 0
    error: SagmqError | None = None
    retain: bool = True  # keep the message until confirmed, to send it again after a lost connection
    nacked: bool = False  # the broker refused a part of it: sent again (after not_before) or failed
    refused: int = 0  # how many times the broker refused it
    not_before: float = 0.0  # (monotonic) a refused send waits until then


def _let_go() -> Iterator[tuple[bytes, pika.BasicProperties]]:
    raise AssertionError("a send with retain=False is never made again")


OpenChannel = Callable[..., Channel]


class Sender:
    """The sends of one bus, in order; the head ones in flight."""

    def __init__(self, settings: Settings, open_channel: OpenChannel, written: Callable[[int, str | None], None]) -> None:
        self._settings = settings
        self._open_channel = open_channel  # Link.channel of the current connection
        self._written = written
        self.sends: deque[Send] = deque()
        self.ch: Channel | None = None
        self.seq = 0  # delivery tags on the current channel
        self.inflight: dict[int, tuple[Send, int, str]] = {}  # delivery tag -> (send, body bytes, message id)
        self.inflight_bytes = 0
        self._by_message_id: dict[str, Send] = {}
        self.due = False  # something to settle, or more to send
        self.reopen = False  # sends keep being refused: the bus should open a new connection

    def add(self, snd: Send) -> None:
        """Queue a send (the bus pumps it)."""
        self.sends.append(snd)
        self.due = True

    def pump(self) -> None:
        """Publish the next parts of pending sends, in order, while the window has room."""
        window = SEND_WINDOW_PARTS * max(self._settings.chunk_bytes, 1)
        now = 0.0
        for snd in self.sends:
            if snd.nacked and snd.error is None:
                return  # refused: it waits for settle(), and the sends behind it with it
            if snd.refused and snd.all_sent and snd.unconfirmed and snd.error is None:
                return  # sent again after a refusal: the sends behind it wait for its confirm
            if snd.all_sent or snd.error is not None:
                continue
            if snd.not_before:
                now = now or time.monotonic()
                if now < snd.not_before:
                    return  # waiting to go again after a refusal: the sends behind it wait their turn
                snd.not_before = 0.0
            if snd.parts is None:
                snd.parts = snd.make_parts()
            while self.inflight_bytes < window and len(self.inflight) < SEND_WINDOW_MESSAGES:
                nxt = next(snd.parts, None)
                if nxt is None:
                    self._all_out(snd)
                    break
                self._publish(snd, *nxt)
                del nxt
            if snd.refused or not snd.all_sent:
                return  # the window is full (or it went again after a refusal): later sends wait their turn

    def _all_out(self, snd: Send) -> None:
        snd.all_sent = True
        snd.parts = None
        if not snd.retain:
            snd.make_parts = _let_go  # the message (a whole model, maybe) can be freed now
        if snd.unconfirmed == 0:
            self.due = True

    def _publish(self, snd: Send, body: bytes, props: pika.BasicProperties) -> None:
        ch = self._channel()
        ch.ch.basic_publish(snd.exchange, snd.routing_key, body, props, mandatory=snd.mandatory)
        self.seq += 1
        mid = props.message_id or ""
        n = len(body)
        self.inflight[self.seq] = (snd, n, mid)
        self.inflight_bytes += n
        snd.unconfirmed += 1
        self._by_message_id[mid] = snd
        self._written(n, props.type)

    def _channel(self) -> Channel:
        if self.ch is not None and self.ch.is_open:
            return self.ch
        self.ch = self._open_channel(confirm=self.on_confirm, on_return=self.on_return, on_close=self.on_closed)
        self.seq = 0
        return self.ch

    def on_confirm(self, frame: Any) -> None:
        """(pika callback) an ack or nack for one send part, or for all up to a tag."""
        m = frame.method
        nack = isinstance(m, pika.spec.Basic.Nack)
        tags = [t for t in self.inflight if t <= m.delivery_tag] if m.multiple else [m.delivery_tag]
        for t in tags:
            item = self.inflight.pop(t, None)
            if item is None:
                continue
            snd, n, mid = item
            self.inflight_bytes -= n
            snd.unconfirmed -= 1
            if self._by_message_id.get(mid) is snd:
                del self._by_message_id[mid]
            if nack and snd.error is None:
                snd.nacked = True
        self.due = True

    def on_return(self, _ch: Any, method: Any, props: pika.BasicProperties, _body: bytes) -> None:
        """(pika callback) a mandatory send part no queue took; its ack follows."""
        snd = self._by_message_id.get(props.message_id or "")
        if snd is not None and snd.error is None:
            snd.error = SagmqError(f"{snd.what} was unroutable ({method.reply_code} {method.reply_text})")

    def on_closed(self, reason: BaseException) -> None:
        """(pika callback) the broker closed the sending channel (e.g. access refused, no such
        exchange): the sends in flight on it failed. A lost connection is not this: those are sent again."""
        if not isinstance(reason, px.ChannelClosedByBroker):
            return
        err = BrokerRefused(f"the broker closed the publishing channel: {reason.reply_code} {reason.reply_text}")
        for snd, _, _ in self.inflight.values():
            snd.unconfirmed -= 1
            if snd.error is None:
                snd.error = err
        self._forget_inflight()
        self.ch = None
        self.due = True

    def settle(self) -> list[Send]:
        """Take the sends that are confirmed or failed off the queue (the caller runs their on_done); a
        refused one is made to go again after a pause, until NACK_RETRIES, then fails."""
        self.due = False
        for snd in self.sends:
            if snd.nacked and snd.unconfirmed == 0 and snd.error is None:
                self._refused(snd)
        done = [x for x in self.sends if x.unconfirmed == 0 and (x.all_sent or x.error is not None)]
        for snd in done:
            self.sends.remove(snd)
        return done

    def _refused(self, snd: Send) -> None:
        """Every part of a refused send is settled: send it again from its first part after a pause, or fail it."""
        snd.nacked = False
        if not snd.retain or snd.refused >= NACK_RETRIES:
            times = f" {snd.refused + 1} times" if snd.refused else ""
            snd.error = SagmqError(f"the broker refused {snd.what} (nack){times}")
            return
        pause = min(NACK_PAUSE_MAX_S, NACK_PAUSE_S * 2 ** snd.refused)
        snd.refused += 1
        if snd.refused % NACK_REOPEN_EVERY == 0:
            self.reopen = True
        snd.parts, snd.all_sent = None, False
        snd.not_before = time.monotonic() + pause
        log.warning("the broker refused %s (nack: a quorum queue without a leader while a cluster node fails "
                    "over, say); sending it again in %.1f s (%d of %d)", snd.what, pause, snd.refused, NACK_RETRIES)

    def next_try_at(self) -> float:
        """When the first send waiting to go again after a refusal may go (0: none waits)."""
        for snd in self.sends:
            if snd.error is None and not snd.all_sent:
                return snd.not_before
        return 0.0

    def _forget_inflight(self) -> None:
        self.inflight.clear()
        self.inflight_bytes = 0
        self._by_message_id.clear()

    def restart(self) -> None:
        """On a new connection: whatever was not confirmed is sent again, from its first part."""
        self.ch, self.seq = None, 0
        self._forget_inflight()
        for snd in self.sends:
            if snd.error is None and snd.all_sent and snd.unconfirmed and not snd.retain:
                snd.error = SagmqError(f"{snd.what}: the connection was lost before the broker confirmed it "
                                       f"(not kept to send again)")
            elif snd.error is None and not (snd.all_sent and snd.unconfirmed == 0):
                snd.parts, snd.all_sent = None, False
            snd.unconfirmed = 0
            snd.nacked = False  # (sent again from its first part anyway)
        if self.sends:
            log.info("sending %d unconfirmed message(s) again", len(self.sends))
            self.due = True
