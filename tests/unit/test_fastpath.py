"""The optional pika fast path: its start-up checks, the fallback to stock pika, nothing patched at
class level, and writing a publish at once (the broker path is covered by every messaging test)."""

from __future__ import annotations

import logging
import socket
import ssl
from collections import deque
from typing import Any

import pytest
from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport, _AsyncTransportBase

from sagmq.amqp import fastpath

STOCK_PRODUCE = _AsyncTransportBase._produce
STOCK_RECV = _AsyncTransportBase._MAX_RECV_BYTES


class Sock:
    """Accepts at most `limit` bytes per sendmsg, then raises EAGAIN once `budget` is used up."""

    def __init__(self, limit: int, budget: int = 10**9) -> None:
        self.limit, self.budget = limit, budget
        self.calls: list[int] = []
        self.data = bytearray()

    def send(self, data: bytes) -> int:
        if self.budget <= 0:
            raise BlockingIOError(11, "try again")
        blob = data[: min(self.limit, self.budget)]
        self.calls.append(len(blob))
        self.data += blob
        self.budget -= len(blob)
        return len(blob)

    def fileno(self) -> int:
        return 99


class Nbio:
    """The I/O services a transport registers its socket with."""

    def __init__(self) -> None:
        self.writers: set[int] = set()

    def set_reader(self, fd: int, cb: Any) -> None:
        pass

    def set_writer(self, fd: int, cb: Any) -> None:
        self.writers.add(fd)

    def remove_writer(self, fd: int) -> bool:
        self.writers.discard(fd)
        return True


class Transport:
    """The attributes of pika's transport that the fast path uses."""

    _STATE_ACTIVE = 1
    _MAX_RECV_BYTES = 4096

    def __init__(self, sock: Any, frames: list[bytes]) -> None:
        self._sock = sock
        self._tx_buffers = deque(frames)
        self._tx_buffered_byte_count = sum(map(len, frames))
        self._state = 1
        self._nbio = Nbio()

    def _produce(self) -> None:
        """pika's writes: frame by frame, the rest kept on a partial send; EAGAIN raised."""
        while self._tx_buffers:
            sent = self._sock.send(self._tx_buffers[0])
            chunk = self._tx_buffers.popleft()
            if sent < len(chunk):
                self._tx_buffers.appendleft(chunk[sent:])


class Conn:
    def __init__(self, transport: Any) -> None:
        self._transport = transport


def frames(n: int) -> list[bytes]:
    return [bytes([i % 251]) * (1 + i % 7) for i in range(n)]


def never_turn(_timeout: float) -> None:
    raise AssertionError("no loop turn expected")


# --- start-up checks and fallback -----------------------------------------------------------


def test_this_pika_with_every_attribute_gets_the_fast_path() -> None:
    t = Transport(Sock(10**6), [])
    assert fastpath.why_not(Conn(t)) == ""
    fp = fastpath.install(Conn(t), True, never_turn)
    assert fp is not None and fp.now and t._MAX_RECV_BYTES == fastpath.RECV_BYTES
    assert Transport._MAX_RECV_BYTES == 4096  # set on the instance only


@pytest.mark.parametrize("version", ["1.5.0", "2.0.1", "1.3.2", "dev"])
def test_an_untested_pika_version_falls_back(version: str) -> None:
    assert "not a version it was tested with" in fastpath.why_not(Conn(Transport(Sock(1), [])), version)


@pytest.mark.parametrize("missing", fastpath.TRANSPORT_NEEDS)
def test_a_missing_attribute_falls_back_to_stock_pika_with_one_info_line(
        missing: str, caplog: pytest.LogCaptureFixture) -> None:
    class Lacking:
        pass

    t = Lacking()
    for a in fastpath.TRANSPORT_NEEDS:
        if a != missing:
            setattr(t, a, 1)
    with caplog.at_level(logging.INFO, logger="sagmq.amqp.fastpath"):
        assert fastpath.install(Conn(t), True, never_turn) is None
    lines = [r for r in caplog.records if r.name == "sagmq.amqp.fastpath"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and missing in lines[0].getMessage()
    assert not hasattr(t, "_MAX_RECV_BYTES") or t._MAX_RECV_BYTES == 1  # nothing set


def test_a_connection_without_transport_falls_back() -> None:
    assert "_transport" in fastpath.why_not(object())
    assert fastpath.install(Conn(None), True, never_turn) is None


def test_switched_off_says_so(caplog: pytest.LogCaptureFixture) -> None:
    t = Transport(Sock(1), [])
    with caplog.at_level(logging.INFO, logger="sagmq.amqp.fastpath"):
        assert fastpath.install(Conn(t), False, never_turn) is None
        assert fastpath.install(Conn(t), False, never_turn, quiet=True) is None
    assert [r.getMessage() for r in caplog.records if r.name == "sagmq.amqp.fastpath"] == [
        "pika fast path not used (SAGMQ_PIKA_FASTPATH=0): stock pika"]
    assert t._MAX_RECV_BYTES == 4096


def test_nothing_is_patched_at_class_level() -> None:
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    try:
        first = _AsyncPlaintextTransport(a, None, Nbio())
        assert fastpath.install(Conn(first), True, never_turn) is not None
        assert first._MAX_RECV_BYTES == fastpath.RECV_BYTES
        fresh = _AsyncPlaintextTransport(c, None, Nbio())  # another connection's, made afterwards
        assert fresh._MAX_RECV_BYTES == STOCK_RECV == 4096
        assert fresh._produce.__func__ is STOCK_PRODUCE
        assert _AsyncTransportBase._produce is STOCK_PRODUCE
        assert _AsyncPlaintextTransport._produce is STOCK_PRODUCE
    finally:
        for s in (a, b, c, d):
            s.close()


def test_an_ssl_transport_keeps_pikas_writes() -> None:
    sock = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).wrap_socket(socket.socket(), server_hostname="broker",
                                                              do_handshake_on_connect=False)
    try:
        t = Transport(sock, frames(2))
        fp = fastpath.install(Conn(t), True, never_turn)
        assert fp is not None and not fp.plain and not fp.now and t._MAX_RECV_BYTES == fastpath.RECV_BYTES
        fp.written(10)  # left to pika's loop
        assert len(t._tx_buffers) == 2
    finally:
        sock.close()


# --- writing now ----------------------------------------------------------------------------


def test_a_small_publish_is_written_at_once_and_the_writer_disarmed() -> None:
    t = Transport(Sock(10**6), frames(3))
    t._nbio.writers.add(99)
    fp = fastpath.FastPath(t, never_turn)
    fp.written(100)
    assert not t._tx_buffers and bytes(t._sock.data) == b"".join(frames(3)) and not t._nbio.writers


def test_what_the_socket_does_not_take_is_left_to_the_loop() -> None:
    fs = frames(5)
    t = Transport(Sock(4, budget=5), fs)
    t._nbio.writers.add(99)
    fastpath.FastPath(t, never_turn).written(100)  # EAGAIN after 5 bytes: not an error
    assert t._nbio.writers == {99} and bytes(t._sock.data) + b"".join(t._tx_buffers) == b"".join(fs)


def test_switched_off_features_are_not_applied() -> None:
    t = Transport(Sock(10**6), frames(2))
    fp = fastpath.FastPath(t, never_turn, frozenset({"large-reads"}))
    fp.written(10)
    assert len(t._tx_buffers) == 2 and t._MAX_RECV_BYTES == fastpath.RECV_BYTES


def test_a_large_part_is_written_whole_by_turning_the_loop() -> None:
    t = Transport(Sock(10**9), frames(4))
    turns: list[float] = []

    def turn(timeout: float) -> None:
        turns.append(timeout)
        t._tx_buffers.popleft()

    fastpath.FastPath(t, turn).written(fastpath.WRITE_WHOLE_BYTES)
    assert len(turns) == 4 and not t._tx_buffers
