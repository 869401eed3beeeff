"""sagmq over AMQPS with mutual TLS, against a private RabbitNode that requires a client certificate."""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sagmq.amqp import AmqpBus
from sagmq.job.spec import read_job_folder
from sagmq.wire.bus import Delivery
from sagmq.wire.errors import BrokerUnavailable
from sagmq.wire.settings import load_settings
from tests.brokernode import RabbitNode, make_certs, running_node
from tests.conftest import JOBS, System

pytestmark = pytest.mark.broker

FINAL = np.array([[4, 5, 6], [7, 8, 9], [10, 11, 12]], dtype=np.float32)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def node(certs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    with running_node(tls=certs, base_dir=tmp_path_factory.mktemp("node")) as n:
        yield n


def tls_env(certs: dict[str, Path], client_cert: bool = True, ca: bool = True) -> dict[str, str]:
    env = {}
    if ca:
        env["SAGMQ_TLS_CA_FILE"] = str(certs["ca_cert"])
    if client_cert:
        env["SAGMQ_TLS_CERT_FILE"] = str(certs["client_cert"])
        env["SAGMQ_TLS_KEY_FILE"] = str(certs["client_key"])
    return env


def connections(node: RabbitNode) -> list[dict]:
    out = node.ctl("list_connections", "user", "ssl", "peer_cert_subject", "client_properties",
                   "--formatter", "json").stdout
    return json.loads(out)


def conn_name(c: dict) -> str:
    props = c["client_properties"]  # a list of [key, type, value] triples
    return next((v for k, _t, v in props if k == "connection_name"), "") if isinstance(props, list) else \
        props.get("connection_name", "")


def test_bus_publishes_and_consumes_over_tls_with_a_client_certificate(node: RabbitNode,
                                                                      certs: dict[str, Path]) -> None:
    settings = load_settings({"SAGMQ_AMQP_URL": node.amqps_url, **tls_env(certs)})
    bus = AmqpBus(settings, "tls-probe", connect_timeout_s=10).connect()
    try:
        queue = f"tls-{uuid.uuid4().hex[:8]}"
        bus.channel.queue_declare(queue, durable=True)
        got: list[Delivery] = []
        bus.consume(queue, got.append)
        bus.publish_raw("", queue, b"hello over tls", bus.properties("probe"))
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            bus.process(0.1)
        assert [d.body for d in got] == [b"hello over tls"]
        assert got[0].user_id == "guest" and got[0].msg_type == "probe"
        (mine,) = [c for c in connections(node) if conn_name(c) == "sagmq-tls-probe"]
        assert mine["ssl"] is True
        assert "CN=sagmq-test-client" in mine["peer_cert_subject"]
    finally:
        bus.close()


def test_without_a_client_certificate_the_broker_refuses_the_connection(node: RabbitNode,
                                                                       certs: dict[str, Path]) -> None:
    settings = load_settings({"SAGMQ_AMQP_URL": node.amqps_url, **tls_env(certs, client_cert=False)})
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable) as e:
        AmqpBus(settings, "no-cert", connect_timeout_s=3).connect()
    assert time.monotonic() - t0 < 15
    # TLS 1.3: the client's handshake completes, then the server's alert arrives as a lost stream
    assert "CERTIFICATE_REQUIRED" in str(e.value)


def test_a_tls_refusal_is_not_retried_like_an_outage(node: RabbitNode, certs: dict[str, Path]) -> None:
    settings = load_settings({"SAGMQ_AMQP_URL": node.amqps_url, **tls_env(certs, client_cert=False)})
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        AmqpBus(settings, "no-cert", connect_timeout_s=8).connect()
    assert time.monotonic() - t0 < 5  # not retried with backoff until the 8 s are over


def test_an_untrusted_server_certificate_is_broker_unavailable(node: RabbitNode,
                                                               certs: dict[str, Path]) -> None:
    settings = load_settings({"SAGMQ_AMQP_URL": node.amqps_url, **tls_env(certs, ca=False)})  # system CAs only
    with pytest.raises(BrokerUnavailable):
        AmqpBus(settings, "untrusting", connect_timeout_s=3).connect()


@pytest.mark.e2e
def test_hello_numpy_sag_over_tls(node: RabbitNode, certs: dict[str, Path], tmp_path: Path) -> None:
    tls = tls_env(certs)
    settings = load_settings({"SAGMQ_AMQP_URL": node.amqps_url, "SAGMQ_PREFIX": f"tls-{uuid.uuid4().hex[:8]}",
                              "SAGMQ_WORKSPACE": str(tmp_path / "ws"), **tls})
    system = System(settings, tmp_path)
    system.env.update(tls)  # System's env carries the URL, prefix and workspace, not the TLS files
    try:
        system.start_core(env=tls)
        for site in ("site-1", "site-2"):
            system.start_client(site, env=tls)
        system.wait_sites(["site-1", "site-2"], timeout=60)
        job_id = system.admin.submit(read_job_folder(JOBS / "hello-numpy-sag"))
        st = system.wait_job(job_id, timeout=120)
        assert st["status"] == "finished", st
        model = np.load(io.BytesIO(system.admin.download(job_id)["models/server.npy"]))
        assert model.dtype == np.float32
        np.testing.assert_array_equal(model, FINAL)
        conns = connections(node)
        names = {conn_name(c) for c in conns}
        assert {f"sagmq-{s}" for s in ("server", "aggregator", "persistor", "client-site-1", "client-site-2",
                                       "admin")} <= names, names
        assert all(c["ssl"] is True and "CN=sagmq-test-client" in c["peer_cert_subject"] for c in conns), conns
    except BaseException:
        print(system.logs())
        print(node.log_tail(60))
        raise
    finally:
        system.close()
