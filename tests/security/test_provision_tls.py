"""`sagmq provision --tls` end to end: a private broker node with the provisioned broker certificate and
definitions, and a site that connects with its env file and its own client certificate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sagmq.amqp import AmqpBus
from sagmq.cli.provision import parse_env, write_provision
from sagmq.wire.settings import load_settings
from tests.brokernode import running_node

pytestmark = pytest.mark.broker


def test_a_site_connects_over_tls_with_what_provision_wrote(tmp_path: Path) -> None:
    out = tmp_path / "prov"
    write_provision(out, ["site-1"], "sag", "sagmq", "localhost", None, True, tls_dir="/etc/sagmq/tls",
                    broker_names=["127.0.0.1"])
    d = out / "tls"
    certs = {"dir": d, "ca_cert": d / "ca.pem", "ca_key": d / "ca.key", "server_cert": d / "broker.pem",
             "server_key": d / "broker.key", "client_cert": d / "site-1.pem", "client_key": d / "site-1.key"}
    with running_node(tls=certs, base_dir=tmp_path / "node") as node:
        node.ctl("import_definitions", str(out / "definitions.json"))
        env = parse_env((out / "sites" / "site-1.env").read_text())
        env = {k: v.replace("/etc/sagmq/tls", str(d)) for k, v in env.items()}  # as mounted in a container
        env["SAGMQ_AMQP_URL"] = env["SAGMQ_AMQP_URL"].replace("localhost:5671", f"localhost:{node.tls_port}")
        settings = load_settings(env)
        bus = AmqpBus(settings, "prov-tls", connect_timeout_s=10).connect()
        try:
            # the site reads its own queue (defined by the definitions), as the provisioned user
            ok = bus.channel.queue_declare(bus.names.site_queue("site-1"), passive=True)
            assert ok.method.message_count == 0
            conns = json.loads(node.ctl("list_connections", "user", "ssl", "peer_cert_subject",
                                        "--formatter", "json").stdout)
        finally:
            bus.close()
        assert any(c["user"] == "site-1" and c["ssl"] is True and "CN=site-1" in c["peer_cert_subject"]
                   for c in conns), conns
        users = json.loads(node.ctl("list_users", "--formatter", "json").stdout)
        assert {u["user"]: u["tags"] for u in users}["admin"] == ["monitoring"]
