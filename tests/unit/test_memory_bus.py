"""The in-memory bus keeps the real bus's contract: routing, CC, prefetch, acks, dead-letters, blobs, sends, rpc, reset."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from sagmq.memory import MemoryBroker, MemoryBus
from sagmq.memory.broker import Envelope, topic_matches
from sagmq.wire.blob import H_CRC, H_HASH, is_part
from sagmq.wire.bus import Delivery
from sagmq.wire.codec import DXO, WEIGHTS, unpack
from sagmq.wire.errors import BrokerRefused, DecodeError, Rejected, RpcTimeout, SagmqError
from sagmq.wire.messages import AdminReply, AdminRequest, Control, TaskResult
from sagmq.wire.settings import Settings
from sagmq.wire.topology import (
    DIRECT,
    FANOUT,
    RK_ADMIN_SERVER,
    RK_RESULT,
    Binding,
    Exchange,
    Queue,
    Topology,
    service_topology,
    site_topology,
)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Parts of 4 kB, so a few thousand floats make a blob."""
    return Settings(prefix="t", workspace=tmp_path, chunk_bytes=4096)


@pytest.fixture
def broker() -> MemoryBroker:
    """A broker with sagmq's topology (prefix t, sites site-1 and site-2)."""
    b = MemoryBroker()
    for topo in (service_topology("t"), site_topology("t", "site-1"), site_topology("t", "site-2")):
        b.declare(topo)
    return b


def bus(broker: MemoryBroker, settings: Settings, user: str | None = None) -> MemoryBus:
    """A connected bus (as user, if given)."""
    return MemoryBus(broker, settings, "test", user).connect()


def drain(b: MemoryBus, queue: str) -> list[Delivery]:
    """Every message now in a queue, consumed and acked."""
    got: list[Delivery] = []
    b.consume(queue, got.append, prefetch=0)
    b.process(0)
    return got


def result(site: str = "site-1", n: int = 4) -> TaskResult:
    """A result of n float32 weights."""
    dxo = DXO(WEIGHTS, {"w": np.arange(n, dtype=np.float32)}, {"NUM_STEPS_CURRENT_ROUND": 1})
    return TaskResult("job", 0, "train", "task-0", site, "OK", dxo)


# --- routing ------------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "key", "match"), [
    ("job.*", "job.running", True), ("job.*", "job", False), ("job.*", "job.a.b", False),
    ("#", "anything.at.all", True), ("#", "", True), ("a.#", "a", True), ("a.#.z", "a.b.c.z", True),
    ("a.#.z", "a.z", True), ("a.#.z", "a.b", False), ("*.b", "a.b", True), ("round.open", "round.close", False),
])
def test_topic_wildcards_match_as_rabbitmq_does(pattern: str, key: str, match: bool) -> None:
    assert topic_matches(pattern, key) is match


def test_topic_direct_fanout_and_default_exchange_route(broker: MemoryBroker, settings: Settings) -> None:
    b = bus(broker, settings)
    n = b.names
    b.publish(n.events, "job.running", Control("x"))  # aggregator and persistor bind job.*
    b.publish(n.results, RK_RESULT, Control("y"))
    b.publish(n.dead, "whatever", Control("z"))  # fanout ignores the key
    b.publish("", n.server_queue, Control("w"))  # the default exchange routes by queue name
    assert [broker.depth(q) for q in (n.aggregator_queue, n.persistor_queue, n.results_queue, n.dead_queue,
                                      n.server_queue)] == [1, 1, 1, 1, 1]


def test_unroutable_mandatory_raises_advisory_is_dropped(broker: MemoryBroker, settings: Settings) -> None:
    b = bus(broker, settings)
    with pytest.raises(SagmqError, match="unroutable"):
        b.publish(b.names.events, "nobody.listens", Control("x"))
    b.publish(b.names.events, "nobody.listens", Control("x"), advisory=True)  # no error: may be lost
    with pytest.raises(BrokerRefused, match="no exchange"):
        b.publish("no-such-exchange", "k", Control("x"))


def test_cc_adds_routing_keys_and_is_not_delivered(broker: MemoryBroker, settings: Settings) -> None:
    b = bus(broker, settings)
    b.publish(b.names.tasks, "site-1", Control("abort", "job"), cc=["site-2"])
    one, two = drain(b, b.names.site_queue("site-1")), drain(b, b.names.site_queue("site-2"))
    assert len(one) == len(two) == 1
    assert "CC" not in one[0].headers and one[0].routing_key == "site-1"
    assert one[0].message(Control, 2**20) == Control("abort", "job")


def test_user_id_is_the_bus_user(broker: MemoryBroker, settings: Settings) -> None:
    bus(broker, settings).publish("", "t.server", Control("x"))
    bus(broker, settings, user="mallory").publish("", "t.server", Control("x"))
    assert [d.user_id for d in drain(bus(broker, settings), "t.server")] == ["guest", "mallory"]


# --- consuming ----------------------------------------------------------------------------


def test_prefetch_limits_unacked_deliveries(broker: MemoryBroker, settings: Settings) -> None:
    b = bus(broker, settings)
    for i in range(5):
        b.publish("", "t.server", Control(str(i)))
    held: list[Delivery] = []

    def hold(d: Delivery) -> None:
        d.deferred = True
        held.append(d)

    b.consume("t.server", hold, prefetch=2)
    b.process(0)
    assert len(held) == 2 and broker.depth("t.server") == 3
    b.ack(held[0])
    b.process(0)
    assert len(held) == 3


def test_requeue_redelivers_and_ack_removes(broker: MemoryBroker, settings: Settings) -> None:
    b = bus(broker, settings)
    b.publish("", "t.server", Control("x"))
    seen: list[Delivery] = []

    def once_requeued(d: Delivery) -> None:
        seen.append(d)
        if len(seen) == 1:
            b.requeue(d)

    b.consume("t.server", once_requeued)
    b.process(0)
    assert [d.redelivered for d in seen] == [False, True]
    assert broker.depth("t.server") == 0


def test_handler_errors_dead_letter_once_with_the_reason(broker: MemoryBroker, settings: Settings) -> None:
    b = bus(broker, settings)
    b.publish("", "t.server", Control("rejected"), headers={"job_id": "j1"})
    b.publish("", "t.server", Control("bug"), headers={"job_id": "j2"})
    b.publish_bytes("", "t.server", b"\xc1 not msgpack", "control")
    calls: list[str] = []

    def handler(d: Delivery) -> None:
        calls.append(d.msg_type)
        c = d.message(Control, 2**20)  # DecodeError for the garbage
        if c.command == "rejected":
            raise Rejected("not today")
        assert c.command == "fine", "a handler bug"

    b.consume("t.server", handler)
    b.process(0)
    dead = drain(b, "t.dead")
    assert len(calls) == 3 and b.dead_lettered == 3  # each once, no redelivery
    reasons = [d.header_str("x-sagmq-reason") for d in dead]
    assert reasons[0] == "not today"
    assert reasons[1].startswith("internal error: AssertionError: a handler bug")
    assert "not valid msgpack" in reasons[2]
    first = dead[0]
    assert first.header_str("x-sagmq-queue") == "t.server" and first.header_str("x-sagmq-original-type") == "control"
    assert first.header_str("job_id") == "j1" and first.msg_type == "dead"
    assert unpack(first.body, 2**20)["command"] == "rejected"  # the original body


def test_a_dead_letter_that_cannot_be_copied_goes_to_the_queue_dlx(settings: Settings) -> None:
    broker = MemoryBroker()  # no t.dead exchange: the copy fails and the queue's own DLX takes it
    broker.declare(Topology((Exchange("dlx", FANOUT),), (Queue("q", {"x-dead-letter-exchange": "dlx"}), Queue("dlq")),
                            (Binding("dlq", "dlx", ""),)))
    b = bus(broker, settings)
    b.publish("", "q", Control("x"))
    b.consume("q", lambda d: (_ for _ in ()).throw(Rejected("no")))
    b.process(0)
    (d,) = drain(b, "dlq")
    assert d.headers["x-death"][0]["reason"] == "rejected" and d.headers["x-death"][0]["queue"] == "q"


def test_an_expired_message_goes_to_the_dlx(broker: MemoryBroker, settings: Settings) -> None:
    b = bus(broker, settings)
    b.publish("", "t.server", Control("x"), expiration_s=0.001)
    with broker.lock:  # (no sleeping: make it old)
        env: Envelope = broker.queues["t.server"].messages[0]
        env.expires_at = 0.0
    assert drain(b, "t.server") == []
    (d,) = drain(b, "t.dead")
    assert d.headers["x-death"][0]["reason"] == "expired"


def test_acking_twice_is_a_channel_error(broker: MemoryBroker, settings: Settings) -> None:
    b = bus(broker, settings)
    b.publish("", "t.server", Control("x"))
    got = drain(b, "t.server")
    b.ack(got[0])  # RabbitMQ closes the channel (unknown delivery tag): the bus reconnects
    generation = b.generation
    b.process(0)
    assert b.generation == generation + 1


# --- blobs --------------------------------------------------------------------------------


def test_large_messages_travel_in_parts_and_are_assembled(broker: MemoryBroker, settings: Settings) -> None:
    b = bus(broker, settings)
    r = result(n=3000)  # 12 kB of floats: a header and three 4 kB parts
    b.publish(b.names.results, RK_RESULT, r)
    assert broker.depth("t.results") == 4
    (d,) = drain(b, "t.results")
    assert len(d.parts) == 4 and d.payload is not None
    got = d.message(TaskResult, settings.max_body_bytes)
    assert got.dxo is not None and np.array_equal(got.dxo.data["w"], r.dxo.data["w"])  # type: ignore[union-attr]
    assert broker.depth("t.results") == 0  # every part acked


def test_stream_consumers_get_the_parts(broker: MemoryBroker, settings: Settings) -> None:
    b = bus(broker, settings)
    b.publish(b.names.results, RK_RESULT, result(n=3000))
    parts: list[Delivery] = []
    b.consume("t.results", parts.append, prefetch=0, stream=True)
    b.process(0)
    assert [d.headers["x-sagmq-part"] for d in parts] == [0, 1, 2, 3] and all(is_part(d.headers) for d in parts)


def test_a_corrupt_part_dead_letters_the_blob(broker: MemoryBroker, settings: Settings) -> None:
    b = bus(broker, settings)
    b.publish(b.names.results, RK_RESULT, result(n=3000))
    with broker.lock:
        h = broker.queues["t.results"].messages[2].headers
        h[H_HASH] = ("0" if h[H_HASH][0] != "0" else "1") + h[H_HASH][1:]
    handled: list[Delivery] = []
    b.consume("t.results", handled.append, prefetch=0)
    b.process(0)
    assert handled == [] and broker.depth("t.results") == 0
    (d,) = drain(b, "t.dead")
    assert "checksum mismatch" in d.header_str("x-sagmq-reason")


def test_parts_checksummed_with_crc32_as_sagmq_sent_before_are_still_checked(broker: MemoryBroker,
                                                                              settings: Settings) -> None:
    import zlib

    b = bus(broker, settings)
    b.publish(b.names.results, RK_RESULT, result(n=3000))
    with broker.lock:
        msgs = broker.queues["t.results"].messages
        for m in list(msgs)[1:]:
            del m.headers[H_HASH]
            m.headers[H_CRC] = zlib.crc32(m.body)
        msgs[3].headers[H_CRC] ^= 1  # the last part's CRC is wrong: the blob is refused
    handled: list[Delivery] = []
    b.consume("t.results", handled.append, prefetch=0)
    b.process(0)
    assert handled == []
    (d,) = drain(b, "t.dead")
    assert "checksum mismatch" in d.header_str("x-sagmq-reason")
    b.publish(b.names.results, RK_RESULT, result(n=3000))
    with broker.lock:
        for m in list(broker.queues["t.results"].messages)[1:]:
            del m.headers[H_HASH]
            m.headers[H_CRC] = zlib.crc32(m.body)
    b.process(0)
    assert len(handled) == 1  # good CRC-32 parts are taken


# --- sends, rpc, reset ----------------------------------------------------------------------


def test_send_settles_at_the_next_process(broker: MemoryBroker, settings: Settings) -> None:
    b = bus(broker, settings)
    done: list[SagmqError | None] = []
    b.send(b.names.results, RK_RESULT, result(n=3000), on_done=done.append)
    b.send(b.names.events, "nobody.listens", Control("x"), on_done=done.append)
    assert done == [] and b.sending == 2 and broker.depth("t.results") == 4
    b.process(0)
    assert done[0] is None and isinstance(done[1], SagmqError) and b.sending == 0


def test_rpc_gets_its_reply_from_a_responder_thread(broker: MemoryBroker, settings: Settings) -> None:
    server = bus(broker, settings)
    big = bytes(range(256)) * 400  # 100 kB: the reply comes in parts

    def answer(d: Delivery) -> None:
        req = d.message(AdminRequest, settings.max_body_bytes)
        server.reply(d, AdminReply(True, {"echo": req.command}, files={"f": big}))

    server.consume("t.server.admin", answer)
    stop = threading.Event()
    t = threading.Thread(target=server.run, args=(stop,))
    t.start()
    try:
        client = bus(broker, settings)
        d = client.rpc(client.names.admin, RK_ADMIN_SERVER, AdminRequest("status"), 5.0)
        reply = d.message(AdminReply, settings.max_body_bytes)
        assert reply.result == {"echo": "status"} and reply.files["f"] == big
        with pytest.raises(RpcTimeout):
            client.rpc(client.names.admin, "persistor", AdminRequest("status"), 0.05)  # nobody consumes it
    finally:
        stop.set()
        broker.wake()
        t.join(5)


def test_reset_redelivers_unacked_and_runs_on_reconnect(broker: MemoryBroker, settings: Settings) -> None:
    b = bus(broker, settings)
    b.publish("", "t.server", Control("x"))
    seen: list[Delivery] = []
    reconnected: list[int] = []
    b.on_reconnect.append(lambda: reconnected.append(b.generation))

    def hold(d: Delivery) -> None:
        d.deferred = True
        seen.append(d)
        if len(seen) == 1:
            b.reset("test")

    b.consume("t.server", hold)
    b.process(0)
    assert reconnected == [2]
    assert [(d.redelivered, d.generation) for d in seen] == [(False, 1), (True, 2)]
    b.ack(seen[0])  # of the old connection: skipped
    assert broker.depth("t.server") == 0
    b.ack(seen[1])
    b.close()
    assert broker.depth("t.server") == 0


def test_close_gives_unacked_back(broker: MemoryBroker, settings: Settings) -> None:
    b = bus(broker, settings)
    b.publish("", "t.server", Control("x"))
    b.consume("t.server", lambda d: setattr(d, "deferred", True))
    b.process(0)
    assert broker.depth("t.server") == 0
    b.close()
    assert broker.depth("t.server") == 1
    with pytest.raises(SagmqError, match="not connected"):
        b.publish("", "t.server", Control("x"))


def test_call_threadsafe_wakes_the_loop_and_ticks_run(broker: MemoryBroker, settings: Settings) -> None:
    b = bus(broker, settings)
    stop = threading.Event()
    ticks: list[int] = []
    t = threading.Thread(target=b.run, args=(stop, lambda: ticks.append(1), 0.01))
    t.start()
    try:
        b.call_threadsafe(stop.set)  # runs on the bus's thread, which then stops
        t.join(5)
        assert not t.is_alive() and ticks
    finally:
        stop.set()
        t.join(5)


def test_browse_leaves_messages_and_redeclaring_differently_is_refused(broker: MemoryBroker,
                                                                      settings: Settings) -> None:
    b = bus(broker, settings)
    b.publish("", "t.server", Control("x"))
    assert [d.msg_type for d in b.browse("t.server")] == ["control"] and broker.depth("t.server") == 1
    with pytest.raises(BrokerRefused, match="PRECONDITION_FAILED"):
        broker.declare(Topology((Exchange("t.events", DIRECT),), (), ()))
    with pytest.raises(DecodeError):
        b.browse("t.server")[0].message(TaskResult, 2**20)


def test_a_handler_the_broker_refuses_closes_the_channel_then_dead_letters(broker: MemoryBroker,
                                                                          settings: Settings) -> None:
    b = bus(broker, settings)
    b.publish("", "t.server", Control("x"))
    calls: list[bool] = []

    def handler(d: Delivery) -> None:
        calls.append(d.redelivered)
        b.publish("no-such-exchange", "k", Control("y"))  # RabbitMQ: 404, the channel is closed

    b.consume("t.server", handler)
    b.process(0)
    b.process(0)
    assert calls == [False] and b.generation == 2
    (d,) = drain(b, "t.dead")
    assert d.header_str("x-sagmq-reason").startswith("handling it made the broker refuse an operation")


def test_threads_publishing_while_a_loop_consumes_lose_nothing(broker: MemoryBroker, settings: Settings) -> None:
    consumer = bus(broker, settings)
    got: list[str] = []
    consumer.consume("t.server", lambda d: got.append(d.message(Control, 2**20).command), prefetch=4)
    stop = threading.Event()
    loop = threading.Thread(target=consumer.run, args=(stop,))
    loop.start()

    def publish(who: str) -> None:
        b = bus(broker, settings)
        for i in range(300):
            b.publish("", "t.server", Control(f"{who}{i}"))

    publishers = [threading.Thread(target=publish, args=(w,)) for w in "ab"]
    try:
        for t in publishers:
            t.start()
        for t in publishers:
            t.join(10)
        consumer.call_threadsafe(stop.set)  # the loop stops; what it left in the queue is served below
        loop.join(10)
        consumer.process(0)  # what was still queued
    finally:
        stop.set()
        loop.join(10)
    assert sorted(got) == sorted(f"{w}{i}" for w in "ab" for i in range(300))
    assert [c for c in got if c.startswith("a")] == [f"a{i}" for i in range(300)]  # each publisher's order kept
