"""Bus.send against the real broker: confirmed publishes that do not block the service's loop."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pika
import pytest

from sagmq.amqp import AmqpBus
from sagmq.amqp.send import SEND_WINDOW_PARTS, Send
from sagmq.wire.blob import H_BLOB, H_PART
from sagmq.wire.bus import Delivery
from sagmq.wire.codec import DXO, WEIGHTS
from sagmq.wire.errors import BrokerRefused, SagmqError
from sagmq.wire.messages import Control, ModelSave
from sagmq.wire.settings import Settings
from sagmq.wire.topology import DIRECT, Binding, Exchange, Queue, Topology
from tests.conftest import wait_for
from tests.faults.tcpproxy import Proxy

pytestmark = pytest.mark.broker

CHUNK = 256 * 1024


def topo(prefix: str) -> Topology:
    ex = f"{prefix}.send"
    qs = (Queue(f"{prefix}.send.a"), Queue(f"{prefix}.send.b"))
    return Topology((Exchange(ex, DIRECT),), qs, (Binding(qs[0].name, ex, "a"), Binding(qs[1].name, ex, "b")))


@pytest.fixture
def small_chunks(settings: Settings) -> Settings:
    return replace(settings, chunk_bytes=CHUNK)


@pytest.fixture
def bus(small_chunks: Settings) -> Iterator[AmqpBus]:
    b = AmqpBus(small_chunks, "test-send", connect_timeout_s=5).connect()
    b.declare(topo(small_chunks.prefix))
    yield b
    if b.sending:
        b.flush_sends(10)
    b.delete(topo(small_chunks.prefix))
    b.close()


def save(rnd: int, n: int) -> ModelSave:
    return ModelSave("job", rnd, DXO(WEIGHTS, {"w": np.arange(n, dtype=np.float32) + rnd}))


def run_until(bus: AmqpBus, pred: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        bus.process(0.05)


def test_sends_are_confirmed_in_order_and_large_ones_arrive_whole(bus: AmqpBus, small_chunks: Settings) -> None:
    p = small_chunks.prefix
    got: list[Delivery] = []
    done: list[tuple[int, SagmqError | None]] = []
    bus.consume(f"{p}.send.a", got.append, prefetch=0)
    sizes = [3, 1_000_000, 5, 2_000_000, 7]  # small and multi-part (16 and 31 parts) messages mixed
    for i, n in enumerate(sizes):
        bus.send(f"{p}.send", "a", save(i, n), on_done=partial(lambda i, err: done.append((i, err)), i))
    assert bus.sending == len(sizes)  # nothing waited for the broker
    run_until(bus, lambda: len(got) == len(sizes) and not bus.sending, 60, "every send")
    assert sorted(done, key=lambda x: x[0]) == [(i, None) for i in range(len(sizes))]  # (confirms may cross)
    for i, (d, n) in enumerate(zip(got, sizes, strict=True)):
        m = d.message(ModelSave, small_chunks.max_body_bytes)
        assert m.round == i  # the queue saw them in the order they were sent
        np.testing.assert_array_equal(m.dxo.data["w"], np.arange(n, dtype=np.float32) + i)


def test_the_loop_serves_deliveries_while_a_large_send_is_in_flight(bus: AmqpBus, small_chunks: Settings,
                                                                     settings: Settings) -> None:
    p = small_chunks.prefix
    seen_while_sending: list[int] = []
    bus.consume(f"{p}.send.b", lambda d: seen_while_sending.append(bus.sending), prefetch=0)
    done: list[SagmqError | None] = []
    bus.send(f"{p}.send", "a", save(0, 8_000_000), on_done=done.append)  # 32 MB: 123 parts
    max_inflight = bus.sender.inflight_bytes
    other = AmqpBus(settings, "test-send-other", connect_timeout_s=5).connect()
    try:
        other.publish(f"{p}.send", "b", Control("status"))
    finally:
        other.close()
    while not done:
        bus.process(0.05)
        max_inflight = max(max_inflight, bus.sender.inflight_bytes)
    assert done == [None]
    assert seen_while_sending and seen_while_sending[0] == 1, "the delivery waited for the whole send"
    # a part goes out while less than the window is unconfirmed: what is held stays under window + one part
    assert 0 < max_inflight <= (SEND_WINDOW_PARTS + 1) * CHUNK
    parts = bus.channel.queue_declare(f"{p}.send.a", passive=True).method.message_count
    assert parts == 1 + -(-32_000_000 // CHUNK)


def test_unroutable_and_refused_sends_report_why_and_later_sends_still_go(bus: AmqpBus, small_chunks: Settings) -> None:
    p = small_chunks.prefix
    results: dict[str, SagmqError | None] = {}
    bus.send(f"{p}.send", "nobody", save(0, 3), on_done=lambda e: results.__setitem__("unroutable", e))
    bus.send(f"{p}.no-such-exchange", "a", save(1, 3), on_done=lambda e: results.__setitem__("no exchange", e))
    run_until(bus, lambda: len(results) == 2, 10, "both failures")
    assert isinstance(results["unroutable"], SagmqError) and "unroutable" in str(results["unroutable"])
    assert isinstance(results["no exchange"], BrokerRefused) and "404" in str(results["no exchange"])
    bus.send(f"{p}.send", "a", save(2, 3), on_done=lambda e: results.__setitem__("after", e))
    run_until(bus, lambda: "after" in results, 10, "the send after the failures")
    assert results["after"] is None
    method, props, _ = bus.channel.basic_get(f"{p}.send.a", auto_ack=True)
    assert method is not None and props.type == "model.save"


def through_proxy(settings: Settings, amqp_url: str) -> tuple[Proxy, Settings]:
    """A TCP proxy to the broker, and settings that connect through it."""
    url = urlsplit(amqp_url)
    proxy = Proxy(url.port or 5672)
    netloc = f"{url.username}:{url.password}@127.0.0.1:{proxy.port}"
    return proxy, replace(settings, amqp_url=urlunsplit(url._replace(netloc=netloc)))


def test_a_send_cut_off_by_a_lost_connection_is_sent_again_whole(small_chunks: Settings, amqp_url: str) -> None:
    proxy, via = through_proxy(small_chunks, amqp_url)
    bus = AmqpBus(via, "test-send-cut", connect_timeout_s=10).connect()
    direct = AmqpBus(small_chunks, "test-send-reader", connect_timeout_s=5).connect()
    try:
        bus.declare(topo(small_chunks.prefix))
        done: list[SagmqError | None] = []
        bus.send(f"{small_chunks.prefix}.send", "a", save(4, 4_000_000), on_done=done.append)  # 62 parts
        run_until(bus, lambda: bus.sender.seq >= 10, 30, "a few parts out")
        proxy.restore()  # drops the live link: the connection dies mid-send
        run_until(bus, lambda: bool(done), 60, "the send to finish after reconnecting")
        assert done == [None]
        got: list[Delivery] = []
        direct.consume(f"{small_chunks.prefix}.send.a", got.append, prefetch=0)
        run_until(direct, lambda: bool(got), 30, "the model")
        m = got[0].message(ModelSave, small_chunks.max_body_bytes)
        np.testing.assert_array_equal(m.dxo.data["w"], np.arange(4_000_000, dtype=np.float32) + 4)
        direct.process(0.5)
        assert len(got) == 1 and direct.dead_lettered == 0  # the first try's parts were folded in, not left over
        assert direct.channel.queue_declare(f"{small_chunks.prefix}.send.a", passive=True).method.message_count == 0
    finally:
        direct.delete(topo(small_chunks.prefix))
        bus.close()
        direct.close()
        proxy.close()


def test_close_waits_for_unconfirmed_sends(bus: AmqpBus, small_chunks: Settings) -> None:
    b = AmqpBus(small_chunks, "test-send-close", connect_timeout_s=5).connect()
    b.send(f"{small_chunks.prefix}.send", "a", save(0, 1_000_000))
    assert b.sending == 1
    b.close()
    wait_for(lambda: bus.channel.queue_declare(f"{small_chunks.prefix}.send.a", passive=True).method.message_count
             == 1 + -(-4_000_000 // CHUNK), 10, "every part in the queue")
    _, props, _ = bus.channel.basic_get(f"{small_chunks.prefix}.send.a", auto_ack=True)
    assert props.headers[H_BLOB] and props.headers[H_PART] == 0


def test_the_bus_reads_the_socket_in_large_pieces_on_its_own_connection_only(bus: AmqpBus) -> None:
    """With the fast path on, the bus's own connection reads 256 KiB at a time; with it off
    (SAGMQ_PIKA_FASTPATH=0), stock pika's 4 KiB. Either way no other pika connection changes."""
    from pika.adapters.utils.io_services_utils import _AsyncTransportBase

    from sagmq.amqp.fastpath import RECV_BYTES

    assert bus._link is not None
    own = bus._link.conn._transport
    if bus.settings.pika_fastpath:
        assert bus._fast is not None
        assert RECV_BYTES >= 128 * 1024
        assert own._MAX_RECV_BYTES == RECV_BYTES
    else:  # stock pika: nothing set on the transport
        assert bus._fast is None
        assert own._MAX_RECV_BYTES == 4096 and not vars(own).keys() & {"_MAX_RECV_BYTES", "_produce"}
    assert _AsyncTransportBase._MAX_RECV_BYTES == 4096  # pika's own class is left alone
    other = pika.BlockingConnection(pika.URLParameters(bus.settings.amqp_url))  # e.g. a custom executor's
    try:
        transport = other._impl._transport
        assert transport._MAX_RECV_BYTES == 4096 and not vars(transport).keys() & {"_MAX_RECV_BYTES", "_produce"}
    finally:
        other.close()


def test_close_does_not_wait_for_a_broker_that_is_gone(small_chunks: Settings, amqp_url: str) -> None:
    proxy, via = through_proxy(small_chunks, amqp_url)
    b = AmqpBus(via, "test-send-gone", connect_timeout_s=30).connect()
    try:
        b.declare(topo(small_chunks.prefix))
        b.send(f"{small_chunks.prefix}.send", "a", save(0, 4_000_000))
        proxy.close()  # the broker is gone: the link is reset and nothing listens any more
        t0 = time.monotonic()
        b.close(flush_s=10.0)
        assert time.monotonic() - t0 < 5  # no reconnecting (30 s allowed) just to flush on the way out
    finally:
        proxy.close()
        cleanup = AmqpBus(small_chunks, "test-send-cleanup", connect_timeout_s=5).connect()
        cleanup.delete(topo(small_chunks.prefix))
        cleanup.close()


@pytest.mark.parametrize("retain", [True, False])
def test_a_send_not_retained_lets_its_message_go_once_its_last_part_is_out(bus: AmqpBus, small_chunks: Settings,
                                                                            retain: bool) -> None:
    import gc
    import weakref

    w = np.arange(1_000_000, dtype=np.float32)
    alive = weakref.ref(w)
    done: list[SagmqError | None] = []
    bus.send(f"{small_chunks.prefix}.send", "a", ModelSave("job", 0, DXO(WEIGHTS, {"w": w})), on_done=done.append,
             retain=retain)
    snd = bus.sender.sends[-1]  # held here, as the bus holds it until every part is confirmed
    del w
    run_until(bus, lambda: snd.all_sent, 30, "every part out")
    gc.collect()
    assert (alive() is not None) == retain  # not retained: freed before the confirms, not after
    run_until(bus, lambda: bool(done), 30, "the confirms")
    assert done == [None]


def test_after_a_lost_connection_a_send_not_retained_fails_and_a_retained_one_starts_again(
        small_chunks: Settings) -> None:
    bus = AmqpBus(small_chunks, "test-restart")  # never connected: only the bookkeeping runs
    kept = Send("x", "a", lambda: iter(()), True, None, "kept", all_sent=True, unconfirmed=2)
    gone = Send("x", "a", lambda: iter(()), True, None, "gone", all_sent=True, unconfirmed=2, retain=False)
    midway = Send("x", "a", lambda: iter(()), True, None, "midway", unconfirmed=1, retain=False)
    bus.sender.sends.extend([kept, gone, midway])
    bus.sender.restart()
    assert (kept.all_sent, kept.error) == (False, None)  # sent again from its first part
    assert gone.error is not None and "lost before the broker confirmed it (not kept to send again)" in str(gone.error)
    assert (midway.all_sent, midway.error) == (False, None)  # its parts were still being made: made again
    assert all(s.unconfirmed == 0 for s in (kept, gone, midway))


def full_queue_topology(prefix: str) -> Topology:
    """A queue that holds one message and refuses (nacks) publishes while it is full."""
    ex = f"{prefix}.send"
    q = Queue(f"{prefix}.send.full", {"x-max-length": 1, "x-overflow": "reject-publish"})
    return Topology((Exchange(ex, DIRECT),), (q,), (Binding(q.name, ex, "full"),))


def test_a_send_the_broker_refuses_goes_again_after_a_pause_and_later_sends_wait_behind_it(
        bus: AmqpBus, small_chunks: Settings, caplog: pytest.LogCaptureFixture) -> None:
    p = small_chunks.prefix
    bus.declare(full_queue_topology(p))
    try:
        done: list[tuple[int, SagmqError | None]] = []
        bus.send(f"{p}.send", "full", save(0, 3), on_done=lambda e: done.append((0, e)))
        run_until(bus, lambda: done, 10, "the first send")
        assert done == [(0, None)]  # the queue is full now
        bus.send(f"{p}.send", "full", save(1, 3), on_done=lambda e: done.append((1, e)))  # refused: nack
        run_until(bus, lambda: "sending it again" in caplog.text, 10, "the refusal")
        bus.send(f"{p}.send", "a", save(2, 3), on_done=lambda e: done.append((2, e)))  # waits behind it
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:  # the refused send keeps trying; the one behind it waits
            bus.process(0.05)
        assert done == [(0, None)]
        method, _, _ = bus.channel.basic_get(f"{p}.send.full", auto_ack=True)  # room again
        assert method is not None
        run_until(bus, lambda: len(done) == 3, 30, "the refused send and the one behind it")
        assert [i for i, _ in done] == [0, 1, 2] and all(e is None for _, e in done)
        method, props, _ = bus.channel.basic_get(f"{p}.send.full", auto_ack=True)
        assert method is not None and props.type == "model.save"  # the refused one, in the end
        assert "(nack: a quorum queue without a leader" in caplog.text
        assert "the broker keeps refusing a send (nack): a new connection" in caplog.text  # after 2 refusals
    finally:
        bus.delete(full_queue_topology(p))


def test_a_send_refused_every_time_fails_with_the_count(bus: AmqpBus, small_chunks: Settings,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import sagmq.amqp.send as send_mod

    monkeypatch.setattr(send_mod, "NACK_RETRIES", 2)
    monkeypatch.setattr(send_mod, "NACK_PAUSE_S", 0.1)
    p = small_chunks.prefix
    bus.declare(full_queue_topology(p))
    try:
        done: list[SagmqError | None] = []
        bus.send(f"{p}.send", "full", save(0, 3), on_done=done.append)
        bus.send(f"{p}.send", "full", save(1, 3), on_done=done.append)
        run_until(bus, lambda: len(done) == 2, 20, "both sends")
        assert done[0] is None
        assert isinstance(done[1], SagmqError) and "(nack) 3 times" in str(done[1])
    finally:
        bus.delete(full_queue_topology(p))
