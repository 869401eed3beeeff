"""The bus's replacement for pika's frame-by-frame socket writes: one sendmsg per batch, partial
sends resumed exactly where they stopped (the broker path is covered by every messaging test)."""

from __future__ import annotations

import socket
import ssl
from collections import deque
from typing import Any

import pytest
from pika.adapters.utils.io_services_utils import _AsyncTransportBase

import sagmq.amqp.bus as bus_mod


class Sock:
    """Accepts at most `limit` bytes per sendmsg, then raises EAGAIN once `budget` is used up."""

    def __init__(self, limit: int, budget: int = 10**9) -> None:
        self.limit, self.budget = limit, budget
        self.calls: list[int] = []
        self.data = bytearray()

    def sendmsg(self, buffers: list[bytes]) -> int:
        if self.budget <= 0:
            raise BlockingIOError(11, "try again")
        blob = b"".join(buffers)[: min(self.limit, self.budget)]
        self.calls.append(len(buffers))
        self.data += blob
        self.budget -= len(blob)
        return len(blob)


class Transport:
    def __init__(self, sock: Any, frames: list[bytes]) -> None:
        self._sock = sock
        self._tx_buffers = deque(frames)
        self._tx_buffered_byte_count = sum(map(len, frames))


def frames(n: int) -> list[bytes]:
    return [bytes([i % 251]) * (1 + i % 7) for i in range(n)]


def test_pika_transports_use_it() -> None:
    assert _AsyncTransportBase._produce is bus_mod._produce_gathered


def test_all_buffered_frames_go_in_one_call_when_the_socket_takes_them() -> None:
    fs = frames(10)
    t = Transport(Sock(limit=10**6), fs)
    bus_mod._produce_gathered(t)
    assert t._sock.calls == [10] and bytes(t._sock.data) == b"".join(fs)
    assert not t._tx_buffers and t._tx_buffered_byte_count == 0


@pytest.mark.parametrize("limit", [1, 3, 5, 13])
def test_partial_sends_resume_mid_frame_in_order(limit: int) -> None:
    fs = frames(150)  # more than one batch of GATHER_BUFFERS
    t = Transport(Sock(limit=limit), fs)
    bus_mod._produce_gathered(t)
    assert bytes(t._sock.data) == b"".join(fs)
    assert max(t._sock.calls) <= bus_mod.GATHER_BUFFERS
    assert not t._tx_buffers and t._tx_buffered_byte_count == 0


def test_eagain_leaves_the_rest_buffered_for_the_next_call() -> None:
    fs = frames(20)
    total = sum(map(len, fs))
    t = Transport(Sock(limit=4, budget=17), fs)
    with pytest.raises(BlockingIOError):
        bus_mod._produce_gathered(t)
    assert t._tx_buffered_byte_count == total - 17 == sum(map(len, t._tx_buffers))
    t._sock.budget = 10**9
    bus_mod._produce_gathered(t)
    assert bytes(t._sock.data) == b"".join(fs)


def test_an_ssl_socket_keeps_pikas_own_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    called = []
    monkeypatch.setattr(bus_mod, "_pika_produce", lambda self: called.append(self))
    sock = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).wrap_socket(socket.socket(), server_hostname="broker",
                                                              do_handshake_on_connect=False)
    try:
        t = Transport(sock, frames(2))
        bus_mod._produce_gathered(t)
        assert called == [t]
    finally:
        sock.close()
