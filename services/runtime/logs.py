"""Logging set up once per process, in main(); pika's own logging kept quiet; repeated warnings of
one kind rate-limited.

A log call that may repeat once per message (a flood of junk is dead-lettered one message at a
time) names its kind: ``log.warning(..., extra={RATE_KIND: "dead-letter sag.server guest"})``. The
handler set up here writes the first line of each (logger, kind), then at most one line per
``RATE_EVERY_S`` seconds: a line that comes after a quiet window carries the count of those held
back, and a timer at the end of a window reports a burst's tail as "N more like this". Modules that
may not import this one (``sagmq.wire``) write the key ``rate_kind`` as a string.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

RATE_KIND = "rate_kind"  # the `extra` key naming a log line's kind
RATE_SUMMARY = "rate_summary"  # set on the "N more like this" lines the limiter writes itself
RATE_EVERY_S = 10.0

Later = Callable[[float, Callable[[], None]], None]


def _timer(delay_s: float, fn: Callable[[], None]) -> None:
    t = threading.Timer(delay_s, fn)
    t.daemon = True  # a pending summary never keeps a stopping process alive
    t.start()


@dataclass(slots=True)
class _Kind:
    """One (logger, kind): when its last line was written, and what was held back since."""

    written_at: float
    held: int = 0
    last: logging.LogRecord | None = None
    timer: bool = False


class RateLimit(logging.Filter):
    """A handler filter that limits the records naming a kind (see the module docstring)."""

    def __init__(self, every_s: float = RATE_EVERY_S, clock: Callable[[], float] = time.monotonic,
                 later: Later = _timer) -> None:
        super().__init__()
        self.every_s, self._clock, self._later = every_s, clock, later
        self._kinds: dict[tuple[str, str], _Kind] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        """Pass a record, or hold it back and count it."""
        kind = getattr(record, RATE_KIND, None)
        if not isinstance(kind, str) or getattr(record, RATE_SUMMARY, False):
            return True
        key, now = (record.name, kind), self._clock()
        with self._lock:
            k = self._kinds.get(key)
            if k is None or now - k.written_at >= self.every_s:
                if k is not None and k.held:  # the timer has not reported them yet: this line does
                    record.msg, record.args = f"{record.getMessage()} (and {k.held} more like this before)", ()
                self._kinds[key] = _Kind(now, timer=k is not None and k.timer)
                return True
            k.held, k.last = k.held + 1, record
            if k.timer:
                return False
            k.timer = True
            delay = k.written_at + self.every_s - now
        self._later(delay, lambda: self._flush(key))
        return False

    def _flush(self, key: tuple[str, str]) -> None:
        """End of a window: write "N more like this" for what it held back (or wait out a newer window)."""
        now = self._clock()
        with self._lock:
            k = self._kinds.get(key)
            if k is None:
                return
            if not k.held or k.last is None:
                k.timer = False
                return
            if now - k.written_at < self.every_s:  # a line was written since: its window ends later
                delay = k.written_at + self.every_s - now
            else:
                held, last, since = k.held, k.last, k.written_at
                self._kinds[key] = _Kind(now)
                delay = -1.0
        if delay >= 0:
            self._later(delay, lambda: self._flush(key))
            return
        _write_summary(last, held, now - since)


def _write_summary(last: logging.LogRecord, held: int, window_s: float) -> None:
    """One line through the logger's handlers: how many lines of a kind were held back, and the last."""
    logger = logging.getLogger(last.name)
    msg = f"{held} more like this in the last {window_s:.0f} s; the last: {last.getMessage()}"
    rec = logger.makeRecord(last.name, last.levelno, last.pathname, last.lineno, msg, (), None,
                            extra={RATE_SUMMARY: True, RATE_KIND: getattr(last, RATE_KIND, "")})
    logger.handle(rec)


def setup_logging(level: str, service: str) -> None:
    """Log lines to stderr as `time level service logger: message`, repeated kinds rate-limited."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s.%(msecs)03d %(levelname)s {service} %(name)s: %(message)s", "%H:%M:%S")
    )
    handler.addFilter(RateLimit())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pika logs every failed connection attempt at ERROR with a traceback; the bus logs each loss
    # and retry itself, with the reason, once
    logging.getLogger("pika").setLevel(logging.CRITICAL)
