"""Optional speed-ups that need pika's internals: the one module that uses pika's private names.

Each is applied to one connection's transport object, never to a class or module, so other pika
connections in the process (a custom executor's, say) keep stock pika. They are applied only when
``Settings.pika_fastpath`` is on (``SAGMQ_PIKA_FASTPATH``, default on), pika's version is one they
were tested with, and every attribute they touch exists; otherwise ``install`` logs one INFO line
saying why and the bus runs on stock pika.

- Large reads: pika reads its socket 4 KiB at a time and appends each read to its frame buffer,
  so a 16 MiB part costs thousands of reads and re-copies. Reads of 256 KiB (two of the broker's
  128 KiB frames) cut the receiving CPU per byte by about 2.7x (measured on this project's machine).
- Writing now: the frames of a publish or an ack are written at once instead of at the loop's next
  turn (a poll and its timers: for a small message, a good part of what a publish costs). A part
  of WRITE_WHOLE_BYTES or more is written whole before the bus goes on: at 8 x 200 MB, writing
  16 MiB parts as the socket took them cost the broker 0.5-1.6 s more CPU a round (smaller reads).
  Plain TCP only: TLS keeps pika's own writes, by its loop.

Left out, as measured on SelectConnection (docs/benchmarks.md): one sendmsg() of all buffered
frames instead of pika's send() per frame paid with BlockingConnection, but with the writes made
at once it changed neither seconds nor CPU per round, at 2 x 9 nor at 8 x 10M.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import Any

import pika

log = logging.getLogger(__name__)

TESTED = ((1, 4),)  # pika major.minor versions these internals were read and measured on
RECV_BYTES = 256 * 1024
WRITE_WHOLE_BYTES = 1 << 20
# the speed-ups by name (see above), each kept because a measurement with SelectConnection said it pays
FEATURES = frozenset({"large-reads", "write-now"})
# what install() reads or replaces, on the connection and on its transport
CONNECTION_NEEDS = ("_transport",)
TRANSPORT_NEEDS = ("_MAX_RECV_BYTES", "_produce", "_sock", "_tx_buffers", "_state", "_STATE_ACTIVE", "_nbio")


def why_not(conn: Any, version: str = pika.__version__) -> str:
    """Why the fast path cannot be used on this connection ('' if it can)."""
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return f"pika {version} is not a version it was tested with"
    if major_minor not in TESTED:
        return f"pika {version} is not a version it was tested with ({', '.join(f'{a}.{b}' for a, b in TESTED)})"
    missing = [a for a in CONNECTION_NEEDS if not hasattr(conn, a)]
    transport = getattr(conn, "_transport", None)
    if transport is None:
        missing.append("_transport (set)")
    else:
        missing += [a for a in TRANSPORT_NEEDS if not hasattr(transport, a)]
    return f"pika {version} lacks {', '.join(missing)}" if missing else ""


class FastPath:
    """The speed-ups, applied to one open connection's transport."""

    def __init__(self, transport: Any, turn: Callable[[float], None], features: frozenset[str] = FEATURES) -> None:
        self._t = transport
        self._turn = turn  # one turn of this connection's I/O loop
        self.plain = not isinstance(transport._sock, ssl.SSLSocket)
        self.now = self.plain and "write-now" in features
        if "large-reads" in features:
            transport._MAX_RECV_BYTES = RECV_BYTES  # an instance attribute: the class keeps pika's 4 KiB

    def written(self, nbytes: int) -> None:
        """A publish or an ack of nbytes was buffered: write it now (plain TCP). What the socket does
        not take now, and any socket error, is left to pika's loop, which handles them as always."""
        t = self._t
        if not self.now or not t._tx_buffers or t._state != t._STATE_ACTIVE:
            return
        if nbytes >= WRITE_WHOLE_BYTES:  # fewer, larger writes cost the broker less CPU
            while t._tx_buffers and t._state == t._STATE_ACTIVE:
                self._turn(1.0)
            return
        try:
            t._produce()
        except OSError:
            return
        if not t._tx_buffers:  # pika's writer must not fire on empty buffers
            t._nbio.remove_writer(t._sock.fileno())


def install(conn: Any, enabled: bool, turn: Callable[[float], None], quiet: bool = False) -> FastPath | None:
    """The fast path for an open pika connection, or None (stock pika) with one INFO line why
    (none if quiet: a reconnect need not say it again)."""
    reason = why_not(conn) if enabled else "SAGMQ_PIKA_FASTPATH=0"
    if reason:
        if not quiet:
            log.info("pika fast path not used (%s): stock pika", reason)
        return None
    return FastPath(conn._transport, turn, FEATURES)
