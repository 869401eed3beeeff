"""`sagmq provision`: definitions derived from the topology, anchored least-privilege regexes, env files."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import stat
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from sagmq.cli.main import main as cli_main
from sagmq.cli.provision import (
    HASHING_ALGORITHM,
    SERVICE_USERS,
    build_definitions,
    check_password,
    hash_password,
    parse_env,
    write_provision,
)
from sagmq.wire.errors import ConfigError
from sagmq.wire.settings import Settings, load_settings
from sagmq.wire.topology import TOPIC, Names, service_topology, site_topology, work_queue_arguments

SITES = ["site-1", "site-2", "site-10"]


def passwords(users: list[str]) -> dict[str, str]:
    return {u: f"pw-{u}-é/:@%" for u in users}


@pytest.fixture
def defs() -> dict:
    return build_definitions(SITES, "sag", "sagmq", passwords([*SITES, *SERVICE_USERS]))


def perm(defs: dict, user: str) -> dict[str, str]:
    (p,) = [p for p in defs["permissions"] if p["user"] == user]
    return p


def topic_perm(defs: dict, user: str, exchange: str) -> dict[str, str]:
    (p,) = [p for p in defs["topic_permissions"] if p["user"] == user and p["exchange"] == exchange]
    return p


def allowed(regex: str, name: str) -> bool:
    """RabbitMQ's check: re:run(Name, Regex) without anchors of its own, i.e. re.search."""
    return re.search(regex, name) is not None


def test_definitions_hold_every_topology_object(defs: dict) -> None:
    never = Settings(site_queue_expires_s=0)  # provisioned site queues never expire (sites cannot re-create them)
    topos = [service_topology("sag"), *(site_topology("sag", s, never) for s in SITES)]
    exchanges = {(e["name"], e["type"]) for e in defs["exchanges"]}
    queues = {q["name"]: q for q in defs["queues"]}
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in defs["bindings"]}
    for topo in topos:
        assert {(e.name, e.type) for e in topo.exchanges} <= exchanges
        for q in topo.queues:
            assert queues[q.name]["arguments"] == q.arguments
            assert queues[q.name]["durable"] is True and queues[q.name]["auto_delete"] is False
        assert {(b.exchange, b.queue, b.routing_key) for b in topo.bindings} <= bindings
    # nothing else, no duplicates, everything in the vhost
    assert len(exchanges) == len(defs["exchanges"]) == len({e.name for t in topos for e in t.exchanges})
    assert len(queues) == len(defs["queues"]) == len({q.name for t in topos for q in t.queues})
    assert len(bindings) == len(defs["bindings"])
    assert all(b["destination_type"] == "queue" for b in defs["bindings"])
    assert {x["vhost"] for k in ("exchanges", "queues", "bindings", "permissions", "topic_permissions")
            for x in defs[k]} == {"sagmq"}
    assert defs["vhosts"] == [{"name": "sagmq"}]
    assert queues[Names("sag").site_queue("site-10")]["arguments"] == work_queue_arguments(Names("sag"))


def test_users_and_hashes(defs: dict) -> None:
    pw = passwords([*SITES, *SERVICE_USERS])
    assert [u["name"] for u in defs["users"]] == [*SITES, "server", "aggregator", "persistor", "admin"]
    for u in defs["users"]:
        assert u["hashing_algorithm"] == HASHING_ALGORITHM == "rabbit_password_hashing_sha256"
        assert u["tags"] == ("monitoring" if u["name"] == "admin" else "")  # the management UI for admin
        raw = base64.b64decode(u["password_hash"])
        salt, digest = raw[:4], raw[4:]
        assert len(salt) == 4 and digest == hashlib.sha256(salt + pw[u["name"]].encode("utf-8")).digest()
        assert check_password(pw[u["name"]], u["password_hash"])
        assert not check_password(pw[u["name"]] + "x", u["password_hash"])
    assert len({u["password_hash"][:8] for u in defs["users"]}) == len(defs["users"])  # fresh salts


def test_hash_matches_rabbitmq_reference() -> None:
    # the worked example of RabbitMQ's docs (passwords.html): salt 908D C60A, password "test12"
    assert hash_password("test12", bytes.fromhex("908DC60A")) == "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"


def test_every_regex_is_anchored(defs: dict) -> None:
    regexes = [p[k] for p in defs["permissions"] for k in ("configure", "write", "read")]
    regexes += [p[k] for p in defs["topic_permissions"] for k in ("write", "read")]
    for r in regexes:
        assert r.startswith("^") and r.endswith("$"), r
        re.compile(r)
        # no top-level alternation can escape the anchors
        assert "|" not in r or (r.startswith("^(?:") and r.endswith(")$")), r


def test_site_reads_only_its_own_queue(defs: dict) -> None:
    n = Names("sag")
    p1 = perm(defs, "site-1")
    assert allowed(p1["read"], n.site_queue("site-1"))
    for other in (n.site_queue("site-10"), n.site_queue("site-2"), n.results_queue, n.server_queue,
                  n.dead_queue, "xsag.site.site-1", "sag.site.site-1x", "sagXsiteXsite-1"):
        assert not allowed(p1["read"], other), other
    assert p1["configure"] == "^$"
    assert not any(allowed(p1["configure"], x) for x in (n.site_queue("site-1"), n.tasks, "anything"))


def test_site_writes_results_heartbeats_and_dead_letters_only(defs: dict) -> None:
    n = Names("sag")
    w = perm(defs, "site-2")["write"]
    assert {x for x in (n.tasks, n.results, n.events, n.admin, n.dead, "amq.default", n.site_queue("site-2"),
                        n.server_queue) if allowed(w, x)} == {n.results, n.events, n.dead}
    t = topic_perm(defs, "site-2", n.events)
    assert allowed(t["write"], "client.heartbeat")
    for rk in ("round.close", "round.aggregated", "contribution", "job.finished", "client.heartbeatX",
               "clientXheartbeat", "control.all"):
        assert not allowed(t["write"], rk), rk
    assert t["read"] == "^$"


def test_only_server_and_aggregator_configure(defs: dict) -> None:
    topo = service_topology("sag")
    names = {e.name for e in topo.exchanges} | {q.name for q in topo.queues}
    for p in defs["permissions"]:
        if p["user"] in ("server", "aggregator"):
            assert all(allowed(p["configure"], x) for x in names)
            assert not allowed(p["configure"], Names("sag").site_queue("site-1"))
            assert not allowed(p["configure"], "sag.other")
        else:
            assert p["configure"] == "^$", p


def test_service_permissions_follow_their_traffic(defs: dict) -> None:
    n = Names("sag")
    server, agg, pers, admin = (perm(defs, u) for u in ("server", "aggregator", "persistor", "admin"))
    assert allowed(server["write"], n.tasks) and allowed(server["write"], "amq.default")
    assert allowed(server["read"], n.server_queue) and allowed(server["read"], n.server_admin_queue)
    assert not allowed(server["read"], n.site_queue("site-1"))
    assert not allowed(agg["write"], n.tasks) and not allowed(agg["write"], "amq.default")
    assert allowed(agg["read"], n.results_queue) and allowed(agg["read"], n.aggregator_queue)
    assert {x for x in (n.tasks, n.results, n.events, n.admin, n.dead, "amq.default") if allowed(pers["write"], x)} \
        == {n.events, n.dead, "amq.default"}
    assert pers["read"] == f"^{re.escape(n.persistor_queue)}$"
    assert admin == {**admin, "configure": "^$", "write": f"^{re.escape(n.admin)}$",
                     "read": f"^{re.escape(n.dead_queue)}$"}  # `sagmq dead list` browses P.dead
    assert allowed(topic_perm(defs, "persistor", n.events)["write"], "model.saved")
    assert not allowed(topic_perm(defs, "persistor", n.events)["write"], "round.close")
    assert allowed(topic_perm(defs, "server", n.events)["write"], "job.finished")
    assert not allowed(topic_perm(defs, "server", n.events)["write"], "client.heartbeat")
    assert allowed(topic_perm(defs, "aggregator", n.events)["write"], "round.aggregated")
    # declaring services may bind every binding key of the topic exchange (topic read is checked on bind)
    for b in service_topology("sag").bindings:
        if b.exchange == n.events:
            assert allowed(topic_perm(defs, "server", n.events)["read"], b.routing_key)
            assert allowed(topic_perm(defs, "aggregator", n.events)["read"], b.routing_key)
    topic = [e.name for e in service_topology("sag").exchanges if e.type == TOPIC]
    assert {(p["user"], p["exchange"]) for p in defs["topic_permissions"]} == \
        {(u["name"], x) for u in defs["users"] for x in topic}


def test_prefix_is_regex_escaped() -> None:
    d = build_definitions(["a"], "x.y", "v", passwords(["a", *SERVICE_USERS]))
    r = perm(d, "a")["read"]
    assert r == r"^x\.y\.site\.a$"
    assert allowed(r, "x.y.site.a") and not allowed(r, "xzy.site.a")


@pytest.mark.parametrize("sites", [["server"], ["admin"], ["site-1", "aggregator"], ["guest"], ["a", "a"],
                                   ["bad name"], []])
def test_refused_site_names(sites: list[str]) -> None:
    with pytest.raises(ConfigError):
        build_definitions(sites, "sag", "sagmq", passwords([*sites, *SERVICE_USERS]))


def test_missing_password_refused() -> None:
    with pytest.raises(ConfigError, match="no password for admin"):
        build_definitions(["s"], "sag", "v", passwords(["s", "server", "aggregator", "persistor"]))


def read_env(path: Path) -> dict[str, str]:
    return parse_env(path.read_text())


def test_write_provision_files(tmp_path: Path) -> None:
    out = tmp_path / "prov"
    write_provision(out, ["site-1", "site-2"], "sag", "my/vhost", "broker.example", 5673, False)
    defs = json.loads((out / "definitions.json").read_text())
    hashes = {u["name"]: u["password_hash"] for u in defs["users"]}
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["definitions.json", "services/admin.env", "services/aggregator.env", "services/persistor.env",
                     "services/server.env", "sites/site-1.env", "sites/site-2.env"]
    for f in out.rglob("*"):
        mode = stat.S_IMODE(f.stat().st_mode)
        assert mode == (0o700 if f.is_dir() else 0o600), (f, oct(mode))
    for user, path in [("site-1", "sites/site-1.env"), ("site-2", "sites/site-2.env"),
                       *((s, f"services/{s}.env") for s in SERVICE_USERS)]:
        env = read_env(out / path)
        u = urlparse(env["SAGMQ_AMQP_URL"])
        assert (u.scheme, u.hostname, u.port, u.path) == ("amqp", "broker.example", 5673, "/my%2Fvhost")
        assert unquote(u.username or "") == user
        assert check_password(unquote(u.password or ""), hashes[user])
        assert len(unquote(u.password or "")) >= 40
        s = load_settings(env)
        assert s.amqp_user == user and s.prefix == "sag"
        assert s.declare is (user in ("server", "aggregator"))
        assert s.site == (user if user.startswith("site-") else "")
        assert not any(k.startswith("SAGMQ_TLS") for k in env)


def test_write_provision_tls_without_certificates(tmp_path: Path) -> None:
    write_provision(tmp_path / "p", ["site-1"], "sag", "sagmq", "mq.example", None, True)
    assert not (tmp_path / "p" / "tls").exists()
    text = (tmp_path / "p" / "sites" / "site-1.env").read_text()
    env = parse_env(text)
    assert env["SAGMQ_AMQP_URL"].startswith("amqps://site-1:") and env["SAGMQ_AMQP_URL"].endswith(
        "@mq.example:5671/sagmq")
    for key in ("SAGMQ_TLS_CA_FILE", "SAGMQ_TLS_CERT_FILE", "SAGMQ_TLS_KEY_FILE"):
        assert f"# {key}=" in text and key not in env


def test_refuses_non_empty_dir_unless_force(tmp_path: Path) -> None:
    out = tmp_path / "p"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        write_provision(out, ["site-1"], "sag", "sagmq", "localhost", 5672, False)
    write_provision(out, ["site-1"], "sag", "sagmq", "localhost", 5672, False, force=True)
    first = read_env(out / "sites" / "site-1.env")["SAGMQ_AMQP_URL"]
    (out / "sites" / "site-1.env").chmod(0o644)
    write_provision(out, ["site-1"], "sag", "sagmq", "localhost", 5672, False, force=True)
    assert read_env(out / "sites" / "site-1.env")["SAGMQ_AMQP_URL"] != first  # new passwords
    assert stat.S_IMODE((out / "sites" / "site-1.env").stat().st_mode) == 0o600
    assert (out / "keep").read_text() == "x"


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert cli_main(["provision", "--sites", "site-1, site-2", "--out", str(out), "--prefix", "fl",
                     "--vhost", "v", "--host", "h", "--tls"]) == 0
    assert "import_definitions" in capsys.readouterr().out
    env = read_env(out / "sites" / "site-2.env")
    assert env["SAGMQ_PREFIX"] == "fl" and env["SAGMQ_SITE"] == "site-2" and env["SAGMQ_DECLARE"] == "0"
    assert env["SAGMQ_AMQP_URL"].endswith("@h:5671/v")
    assert cli_main(["provision", "--sites", "site-1", "--out", str(out)]) == 4  # not empty
    assert "--force" in capsys.readouterr().err
    assert cli_main(["provision", "--sites", "persistor", "--out", str(tmp_path / "x")]) == 4
    assert not (tmp_path / "x").exists()


# --- --tls: a CA, the broker's and every user's certificate --------------------------------------


@pytest.fixture(scope="module")
def tls_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tls") / "prov"
    write_provision(out, ["site-1", "site-2"], "sag", "sagmq", "mq.example", None, True, tls_dir="/etc/sagmq/tls",
                    broker_names=["rabbitmq", "127.0.0.1", "mq.example"])
    return out


def test_tls_files(tls_out: Path) -> None:
    users = ["site-1", "site-2", *SERVICE_USERS]
    files = sorted(p.name for p in (tls_out / "tls").iterdir())
    assert files == sorted(["ca.pem", "ca.key", "broker.pem", "broker.key", "rabbitmq.conf",
                            *(f"{u}.pem" for u in users), *(f"{u}.key" for u in users)])
    for f in (tls_out / "tls").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == (0o600 if f.suffix == ".key" else 0o644), f
    conf = (tls_out / "tls" / "rabbitmq.conf").read_text()
    assert "listeners.ssl.default = 5671" in conf and "ssl_options.fail_if_no_peer_cert = true" in conf
    assert "ssl_options.certfile = /etc/rabbitmq/tls/broker.pem" in conf


def test_tls_certificates(tls_out: Path) -> None:
    from cryptography import x509

    d = tls_out / "tls"
    ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    broker = x509.load_pem_x509_certificate((d / "broker.pem").read_bytes())
    site = x509.load_pem_x509_certificate((d / "site-2.pem").read_bytes())
    for cert in (broker, site):
        cert.verify_directly_issued_by(ca)
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mq.example", "rabbitmq"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    cn = site.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    assert cn == "site-2"  # the broker user, for EXTERNAL login
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True


def test_tls_env_files_point_at_the_mounted_files(tls_out: Path, tmp_path: Path) -> None:
    env = read_env(tls_out / "sites" / "site-1.env")
    assert env["SAGMQ_TLS_CA_FILE"] == "/etc/sagmq/tls/ca.pem"
    assert env["SAGMQ_TLS_CERT_FILE"] == "/etc/sagmq/tls/site-1.pem"
    assert env["SAGMQ_TLS_KEY_FILE"] == "/etc/sagmq/tls/site-1.key"
    assert env["SAGMQ_TLS_SERVER_NAME"] == "mq.example"
    assert env["SAGMQ_AMQP_URL"].startswith("amqps://site-1:")
    assert read_env(tls_out / "services" / "server.env")["SAGMQ_TLS_CERT_FILE"] == "/etc/sagmq/tls/server.pem"
    # as mounted (here: the files in place of /etc/sagmq/tls), the settings load
    local = {k: v.replace("/etc/sagmq/tls", str(tls_out / "tls")) for k, v in env.items()}
    s = load_settings(local)
    assert s.tls_cert_file.endswith("site-1.pem") and s.amqp_user == "site-1"


def test_tls_handshake_with_the_provisioned_certificates(tls_out: Path) -> None:
    """A TLS server with the broker's certificate that requires a client certificate, as rabbitmq.conf sets
    up, and a client configured as sagmq.amqp.connection configures it from the env file."""
    import socket
    import ssl
    import threading

    d = tls_out / "tls"
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(d / "broker.pem", d / "broker.key")
    server_ctx.load_verify_locations(d / "ca.pem")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
    client_ctx.load_cert_chain(d / "site-1.pem", d / "site-1.key")
    listener = socket.create_server(("127.0.0.1", 0))
    peer: list[object] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            peer.append(tls.getpeercert())
            tls.sendall(b"ok")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                client_ctx.wrap_socket(raw, server_hostname="rabbitmq") as tls:
            assert tls.recv(2) == b"ok"
        t.join(10)
    finally:
        listener.close()
    subject = dict(x[0] for x in peer[0]["subject"])  # type: ignore[index]
    assert subject["commonName"] == "site-1"
    # a name the certificate does not carry is refused
    listener = socket.create_server(("127.0.0.1", 0))

    def refuse() -> None:
        conn, _ = listener.accept()
        try:
            server_ctx.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            conn.close()

    t = threading.Thread(target=refuse, daemon=True)
    t.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                pytest.raises(ssl.SSLCertVerificationError):
            client_ctx.wrap_socket(raw, server_hostname="elsewhere.example")
    finally:
        listener.close()


def test_tls_cli_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert cli_main(["provision", "--sites", "site-1", "--out", str(out), "--host", "mq", "--tls",
                     "--tls-dir", "/certs/", "--broker-names", "rabbitmq, node-2"]) == 0
    assert "/certs" in capsys.readouterr().out
    assert read_env(out / "sites" / "site-1.env")["SAGMQ_TLS_KEY_FILE"] == "/certs/site-1.key"
    assert (out / "tls" / "broker.pem").exists()
    assert cli_main(["provision", "--sites", "ca", "--out", str(tmp_path / "x"), "--tls"]) == 4  # OUT/tls/ca.pem
