"""The rate limit of repeated log lines of one kind (sagmq.runtime.logs.RateLimit), on a fake clock."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest

from sagmq.runtime.logs import RATE_KIND, RateLimit


class Clock:
    """A clock the test moves, and the timers the limiter asked for."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def __call__(self) -> float:
        return self.now

    def later(self, delay_s: float, fn: Callable[[], None]) -> None:
        self.timers.append((self.now + delay_s, fn))

    def advance(self, s: float) -> None:
        """Move on, firing the timers that are due."""
        self.now += s
        due = [t for t in self.timers if t[0] <= self.now]
        self.timers = [t for t in self.timers if t[0] > self.now]
        for _, fn in due:
            fn()


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def out(clock: Clock) -> Iterator[tuple[logging.Logger, Lines]]:
    log = logging.getLogger("sagmq.test_logs")
    handler = Lines()
    handler.addFilter(RateLimit(every_s=10.0, clock=clock, later=clock.later))
    log.addHandler(handler)
    log.propagate, log.level = False, logging.INFO
    try:
        yield log, handler
    finally:
        log.removeHandler(handler)
        log.propagate = True


def warn(log: logging.Logger, kind: str, i: int) -> None:
    log.warning("junk %d refused", i, extra={RATE_KIND: kind})


def test_the_first_line_of_a_kind_then_one_summary_per_window(out: tuple[logging.Logger, Lines],
                                                             clock: Clock) -> None:
    log, h = out
    for i in range(1000):
        warn(log, "dead-letter q", i)
    assert h.lines == ["junk 0 refused"]
    clock.advance(10)
    assert h.lines == ["junk 0 refused", "999 more like this in the last 10 s; the last: junk 999 refused"]
    clock.advance(60)
    assert len(h.lines) == 2  # nothing more to report


def test_a_line_after_a_quiet_window_is_written_with_what_was_held(out: tuple[logging.Logger, Lines],
                                                                   clock: Clock) -> None:
    log, h = out
    warn(log, "k", 1)
    warn(log, "k", 2)
    clock.now += 11  # past the window, before its timer ran
    warn(log, "k", 3)
    assert h.lines == ["junk 1 refused", "junk 3 refused (and 1 more like this before)"]
    clock.advance(20)
    assert len(h.lines) == 2  # the old timer finds nothing left to report


def test_kinds_and_loggers_are_limited_apart(out: tuple[logging.Logger, Lines], clock: Clock) -> None:
    log, h = out
    warn(log, "dead-letter sag.server guest", 1)
    warn(log, "dead-letter sag.results guest", 2)
    warn(log, "dead-letter sag.server guest", 3)
    log.warning("a line without a kind")
    log.warning("a line without a kind")
    assert h.lines == ["junk 1 refused", "junk 2 refused", "a line without a kind", "a line without a kind"]


def test_a_steady_trickle_writes_at_most_one_line_per_window(out: tuple[logging.Logger, Lines],
                                                             clock: Clock) -> None:
    log, h = out
    for i in range(600):  # one a second for ten minutes
        warn(log, "k", i)
        clock.advance(1)
    assert 55 <= len(h.lines) <= 61
    assert sum(int(line.split()[0]) for line in h.lines[1:] if "more like this" in line) + \
        sum(1 for line in h.lines if not line[0].isdigit()) == 600  # every line counted once
