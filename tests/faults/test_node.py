"""Smoke tests of tests/brokernode.RabbitNode: private, configurable, restartable, cleaned up."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from tests.brokernode import RabbitNode, running_node

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    with running_node(config=["consumer_timeout = 60000"], base_dir=tmp_path_factory.mktemp("node")) as n:
        yield n


def publish(node: RabbitNode, queue: str, *bodies: tuple[bytes, bool]) -> None:
    """Publish (body, persistent) pairs to a durable queue, each confirmed by the broker."""
    conn = pika.BlockingConnection(pika.URLParameters(node.url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.queue_declare(queue, durable=True)
        for body, persistent in bodies:
            mode = pika.DeliveryMode.Persistent if persistent else pika.DeliveryMode.Transient
            ch.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=mode), mandatory=True)
    finally:
        conn.close()


def drain(node: RabbitNode, queue: str) -> list[bytes]:
    conn = pika.BlockingConnection(pika.URLParameters(node.url))
    try:
        ch = conn.channel()
        out = []
        while True:
            method, _props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append(body)
    finally:
        conn.close()


def test_node_is_private_and_config_lines_take_effect(node: RabbitNode) -> None:
    assert node.eval("node().") == f"'{node.name}'"
    assert node.eval("application:get_env(rabbit, consumer_timeout).") == "{ok,60000}"
    assert "{consumer_timeout,60000}" in node.ctl("environment").stdout
    listeners = node.eval(
        "[{P, Port, IP} || {listener, _, P, _, IP, Port, _} <- rabbit_networking:active_listeners()].")
    # its own AMQP port and distribution port, on loopback only; never the shared node's 5672
    assert listeners.replace("\n", "").replace(" ", "") == (
        f"[{{clustering,{node.dist_port},{{127,0,0,1}}}},{{amqp,{node.port},{{127,0,0,1}}}}]")
    assert node.ctl("list_vhosts").stdout.split() == ["name", "/"]  # a fresh node: only the default vhost
    assert node.eval("rabbit_plugins:active().") == "[]"


def test_restart_keeps_persistent_messages_of_durable_queues(node: RabbitNode) -> None:
    publish(node, "survivor", (b"persistent", True), (b"transient", False))
    before = node.beam_pid()
    node.restart()
    assert node.beam_pid() not in (None, before)  # really a new Erlang VM, on the same data directory
    assert drain(node, "survivor") == [b"persistent"]  # the transient one went with the old VM
    assert node.eval("application:get_env(rabbit, consumer_timeout).") == "{ok,60000}"


def test_confirmed_persistent_messages_survive_a_crash(node: RabbitNode) -> None:
    publish(node, "crash-survivor", (b"confirmed", True))
    node.kill()  # SIGKILL: no clean shutdown
    assert not node.running and node.beam_pid() is None
    node.start()
    assert drain(node, "crash-survivor") == [b"confirmed"]


def test_running_node_stops_and_removes_the_node_when_the_test_fails(tmp_path: Path) -> None:
    # the node's context exits first (with the error), then pytest.raises takes the error
    with pytest.raises(RuntimeError, match="test body failed"), running_node(base_dir=tmp_path) as n:
        d = n.dir
        assert n.pids()
        raise RuntimeError("test body failed")
    assert not n.pids()
    assert not d.exists()
    assert not n.running
