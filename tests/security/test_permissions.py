"""Least privilege on a real broker: a PRIVATE RabbitMQ node loaded with `sagmq provision`'s definitions.

The shared broker is never touched: every connection here goes to a node this module starts.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pika
import pika.exceptions as px
import pytest

from sagmq.cli.procs import LocalStack
from sagmq.cli.provision import SERVICE_USERS, parse_env, write_provision
from sagmq.wire.topology import RK_CROSS_VAL_SAVE, RK_HEARTBEAT, RK_RESULT, RK_RESULT_SERVER, RK_ROUND_CLOSE, Names
from tests.brokernode import RabbitNode, running_node

pytestmark = [pytest.mark.broker]

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "jobs"
PREFIX = "sag"
VHOST = "sagmq"
SITES = ["site-1", "site-2"]
N = Names(PREFIX)
FINAL = np.array([[4, 5, 6], [7, 8, 9], [10, 11, 12]], dtype=np.float32)


class Provisioned:
    """The provisioned folder of a node, with its env files parsed."""

    def __init__(self, node: RabbitNode, out: Path) -> None:
        self.node = node
        self.out = out
        self.definitions = json.loads((out / "definitions.json").read_text())
        self.env = {s: parse_env((out / "sites" / f"{s}.env").read_text()) for s in SITES}
        self.env.update({s: parse_env((out / "services" / f"{s}.env").read_text()) for s in SERVICE_USERS})

    def connect(self, user: str) -> pika.BlockingConnection:
        params = pika.URLParameters(self.env[user]["SAGMQ_AMQP_URL"])
        params.connection_attempts = 1
        return pika.BlockingConnection(params)

    def purge_all(self) -> None:
        for q in self.definitions["queues"]:
            self.node.ctl("purge_queue", "-p", VHOST, q["name"])


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    with running_node(base_dir=tmp_path_factory.mktemp("node")) as n:
        yield n


@pytest.fixture(scope="module")
def prov(node: RabbitNode, tmp_path_factory: pytest.TempPathFactory) -> Provisioned:
    out = tmp_path_factory.mktemp("prov") / "out"
    u = urlparse(node.url)
    assert u.hostname and u.port
    write_provision(out, SITES, PREFIX, VHOST, u.hostname, u.port, False)
    node.ctl("import_definitions", str(out / "definitions.json"))
    return Provisioned(node, out)


@pytest.fixture
def conns(prov: Provisioned) -> Iterator[Callable[[str], pika.BlockingConnection]]:
    """Open connections as a provisioned user; all closed after the test."""
    opened: list[pika.BlockingConnection] = []

    def open_(user: str) -> pika.BlockingConnection:
        c = prov.connect(user)
        opened.append(c)
        return c

    yield open_
    for c in opened:
        if c.is_open:
            c.close()


def props(user: str, **kw: Any) -> pika.BasicProperties:
    return pika.BasicProperties(user_id=user, type="test", **kw)


def refused(fn: Callable[[], Any], code: int = 403) -> str:
    """Run fn, which must make the broker close the channel with code; the broker's reason."""
    with pytest.raises(px.ChannelClosedByBroker) as e:
        fn()
    assert e.value.reply_code == code, e.value
    return str(e.value.reply_text)


# --- import -------------------------------------------------------------------------------------


def test_import_created_users_vhost_and_topology(prov: Provisioned) -> None:
    users = prov.node.ctl("list_users", "--formatter", "json").stdout
    names = {u["user"] for u in json.loads(users)}
    assert {*SITES, *SERVICE_USERS} <= names
    queues = {q["name"] for q in json.loads(prov.node.ctl("list_queues", "-p", VHOST, "name", "arguments",
                                                          "--formatter", "json").stdout)}
    assert queues == {q["name"] for q in prov.definitions["queues"]}
    perms = json.loads(prov.node.ctl("list_topic_permissions", "-p", VHOST, "--formatter", "json").stdout)
    assert {(p["user"], p["exchange"], p["write"]) for p in perms} >= {("site-1", N.events, r"^client\.heartbeat$")}


def test_load_definitions_at_boot(prov: Provisioned, tmp_path: Path) -> None:
    """The same file works as rabbitmq.conf's load_definitions (a second, short-lived private node)."""
    with running_node(config=[f"load_definitions = {prov.out / 'definitions.json'}"], base_dir=tmp_path) as n2:
        c = pika.BlockingConnection(pika.URLParameters(
            prov.env["site-1"]["SAGMQ_AMQP_URL"].replace(f":{prov.node.port}/", f":{n2.port}/")))
        try:
            ch = c.channel()
            ch.basic_consume(N.site_queue("site-1"), lambda *a: None)
        finally:
            c.close()


def test_wrong_password_is_refused(prov: Provisioned) -> None:
    url = prov.env["site-1"]["SAGMQ_AMQP_URL"]
    user, rest = url.split("://", 1)[1].split(":", 1)
    bad = f"amqp://{user}:wrong{rest[rest.index('@'):]}"
    with pytest.raises(px.ProbableAuthenticationError):
        pika.BlockingConnection(pika.URLParameters(bad))


# --- a site -------------------------------------------------------------------------------------


def test_site_consumes_its_own_queue(conns: Callable[[str], pika.BlockingConnection]) -> None:
    ch = conns("site-1").channel()
    tag = ch.basic_consume(N.site_queue("site-1"), lambda *a: None)
    ch.basic_cancel(tag)
    assert ch.basic_get(N.site_queue("site-1")) == (None, None, None)


@pytest.mark.parametrize("queue", [N.site_queue("site-2"), N.results_queue, N.server_queue, N.dead_queue])
def test_site_cannot_consume_other_queues(conns: Callable[[str], pika.BlockingConnection], queue: str) -> None:
    c = conns("site-1")
    reason = refused(lambda: c.channel().basic_consume(queue, lambda *a: None))
    assert f"access to queue '{queue}' in vhost '{VHOST}' refused for user 'site-1'" in reason
    refused(lambda: c.channel().basic_get(queue))


def test_site_publishes_results(prov: Provisioned, conns: Callable[[str], pika.BlockingConnection]) -> None:
    ch = conns("site-1").channel()
    ch.confirm_delivery()
    ch.basic_publish(N.results, RK_RESULT, b"x", props("site-1"), mandatory=True)  # confirmed and routed
    ch.basic_publish(N.dead, "", b"x", props("site-1"), mandatory=True)  # a dead-lettered task copy
    prov.purge_all()


def test_site_sends_cross_site_results_to_the_server_and_the_server_saves_them(
        prov: Provisioned, conns: Callable[[str], pika.BlockingConnection]) -> None:
    ch = conns("site-1").channel()
    ch.confirm_delivery()
    ch.basic_publish(N.results, RK_RESULT_SERVER, b"x", props("site-1"), mandatory=True)  # confirmed and routed
    ch = conns("server").channel()
    ch.confirm_delivery()
    ch.basic_publish(N.events, RK_CROSS_VAL_SAVE, b"x", props("server"), mandatory=True)
    c = conns("site-1")
    ch = c.channel()
    ch.confirm_delivery()
    reason = refused(functools.partial(ch.basic_publish, N.events, RK_CROSS_VAL_SAVE, b"x", props("site-1")))
    assert "topic" in reason and RK_CROSS_VAL_SAVE in reason
    prov.purge_all()


def test_site_cannot_spoof_another_user(conns: Callable[[str], pika.BlockingConnection]) -> None:
    ch = conns("site-1").channel()
    ch.confirm_delivery()
    reason = refused(lambda: ch.basic_publish(N.results, RK_RESULT, b"x", props("site-2"), mandatory=True), 406)
    assert "user_id" in reason


@pytest.mark.parametrize("exchange", [N.tasks, N.admin, ""])
def test_site_cannot_publish_tasks_or_admin(conns: Callable[[str], pika.BlockingConnection], exchange: str) -> None:
    ch = conns("site-1").channel()
    ch.confirm_delivery()
    reason = refused(lambda: ch.basic_publish(exchange, "site-2", b"x", props("site-1")))
    assert f"access to exchange '{exchange or 'amq.default'}'" in reason


def test_site_cannot_declare_or_bind(conns: Callable[[str], pika.BlockingConnection]) -> None:
    c = conns("site-1")
    refused(lambda: c.channel().queue_declare("sag.evil", durable=True))
    refused(lambda: c.channel().queue_declare(N.site_queue("site-1"), durable=True,
                                              arguments={"x-queue-type": "classic",
                                                         "x-dead-letter-exchange": N.dead}))
    refused(lambda: c.channel().exchange_declare("sag.evil", "fanout"))
    refused(lambda: c.channel().exchange_declare(N.tasks, "direct", durable=True))
    refused(lambda: c.channel().queue_bind(N.site_queue("site-1"), N.events, "#"))
    refused(lambda: c.channel().queue_delete(N.site_queue("site-2")))


def test_site_topic_permission_on_events(prov: Provisioned, conns: Callable[[str], pika.BlockingConnection]) -> None:
    c = conns("site-1")
    ch = c.channel()
    ch.confirm_delivery()
    ch.basic_publish(N.events, RK_HEARTBEAT, b"x", props("site-1"), mandatory=True)
    for rk in (RK_ROUND_CLOSE, "round.aggregated", "job.finished", "control.all"):
        ch = c.channel()
        ch.confirm_delivery()
        reason = refused(functools.partial(ch.basic_publish, N.events, rk, b"x", props("site-1")))
        assert "topic" in reason and rk in reason
    prov.purge_all()


def test_a_site_cc_into_another_sites_queue_is_refused_or_shows_its_user(
        prov: Provisioned, conns: Callable[[str], pika.BlockingConnection]) -> None:
    """RabbitMQ 3.x checks topic permissions on the routing key only, not on CC keys: site-1 can put a
    heartbeat-keyed message into site-2's queue through site-2's aggregate.<site> binding. The broker
    still stamps it with site-1's validated user_id, which is what site-2 checks before taking a
    forwarded aggregate (tests/unit/test_client_forward.py); RabbitMQ 4 refuses the publish."""
    prov.purge_all()
    ch = conns("site-1").channel()
    ch.confirm_delivery()
    try:
        ch.basic_publish(N.events, RK_HEARTBEAT, b"x", props("site-1", headers={"CC": ["aggregate.site-2"]}))
    except px.ChannelClosedByBroker as e:
        assert e.reply_code == 403 and "aggregate.site-2" in str(e.reply_text)
        return
    method, p, _ = conns("site-2").channel().basic_get(N.site_queue("site-2"), auto_ack=True)
    assert method is not None, "the CC did not route: the binding aggregate.site-2 is missing"
    assert p.user_id == "site-1"
    prov.purge_all()


# --- services -----------------------------------------------------------------------------------


def test_admin_uses_direct_reply_to_without_read_permission(
        conns: Callable[[str], pika.BlockingConnection]) -> None:
    c = conns("admin")
    ch = c.channel()
    ch.confirm_delivery()
    tag = ch.basic_consume("amq.rabbitmq.reply-to", lambda *a: None, auto_ack=True)
    ch.basic_cancel(tag)
    refused(lambda: c.channel().basic_consume(N.server_admin_queue, lambda *a: None))
    refused(lambda: c.channel().basic_get(N.results_queue))
    assert c.channel().basic_get(N.dead_queue) == (None, None, None)  # `sagmq dead list` browses it
    ch = c.channel()
    ch.confirm_delivery()
    refused(lambda: ch.basic_publish(N.events, "control.all", b"x", props("admin")))


def test_persistor_cannot_publish_round_events(conns: Callable[[str], pika.BlockingConnection]) -> None:
    c = conns("persistor")
    ch = c.channel()
    ch.confirm_delivery()
    refused(lambda: ch.basic_publish(N.events, RK_ROUND_CLOSE, b"x", props("persistor")))
    refused(lambda: c.channel().basic_consume(N.results_queue, lambda *a: None))
    refused(lambda: c.channel().queue_declare(N.persistor_queue, durable=True))


def test_aggregator_cannot_send_tasks(conns: Callable[[str], pika.BlockingConnection]) -> None:
    ch = conns("aggregator").channel()
    ch.confirm_delivery()
    refused(lambda: ch.basic_publish(N.tasks, "site-1", b"x", props("aggregator")))


@pytest.mark.parametrize("user", ["server", "aggregator"])
def test_declaring_services_are_held_to_the_topology(conns: Callable[[str], pika.BlockingConnection],
                                                     user: str) -> None:
    c = conns(user)
    refused(lambda: c.channel().queue_declare("sag.evil", durable=True))
    refused(lambda: c.channel().queue_declare(N.site_queue("site-1"), durable=True))
    refused(lambda: c.channel().basic_consume(N.site_queue("site-1"), lambda *a: None))
    reason = refused(lambda: c.channel().queue_bind(N.server_queue, N.events, "#"))  # topic read, on bind
    assert "access to topic '#' in exchange" in reason
    c.channel().queue_bind(N.server_queue, N.events, RK_HEARTBEAT)  # a binding of the topology: allowed


# --- the real services, each with only its env file ---------------------------------------------


def _sagmq_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of a sagmq process: no inherited SAGMQ_* variable, then the env file's."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("SAGMQ_")}, **extra}


def test_services_run_hello_numpy_sag_with_their_env_files(prov: Provisioned, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    prov.purge_all()
    broker_log = prov.node.log_dir / f"{prov.node.name}.log"
    log_start = broker_log.stat().st_size
    for k in [k for k in os.environ if k.startswith("SAGMQ_")]:
        monkeypatch.delenv(k)
    ws = {"SAGMQ_WORKSPACE": str(tmp_path / "ws")}
    stack = LocalStack(ws, tmp_path / "logs")

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sagmq.cli.main", *args], env=_sagmq_env(prov.env["admin"]),
                              capture_output=True, text=True, timeout=timeout, cwd=tmp_path)

    def logs() -> str:
        return "\n".join(f"--- {p.name} (rc {p.popen.poll()})\n{p.tail(60)}" for p in stack.procs) + \
            "\n--- broker\n" + prov.node.log_tail(60)

    try:
        for svc in ("persistor", "aggregator", "server"):
            # the server forwards even this 36-byte model: the aggregator's CC to the sites and the
            # sites' check of who sent it run under least privilege too
            stack.start(svc, svc, env={**prov.env[svc], "SAGMQ_FORWARD_MIN_BYTES": "0"} if svc == "server"
                        else prov.env[svc])
        for site in SITES:
            stack.start(site, "client", env=prov.env[site])  # the site name comes from SAGMQ_SITE
        deadline = time.monotonic() + 60
        while True:
            st = run("status", "--json", timeout=30)
            alive = {s["site"] for s in json.loads(st.stdout)["sites"] if s["alive"]} if st.returncode == 0 else set()
            if set(SITES) <= alive:
                break
            assert not stack.dead(), logs()
            assert time.monotonic() < deadline, st.stdout + st.stderr + logs()
            time.sleep(0.5)
        # hello-numpy-cross-val: hello-numpy-sag's training, then cross-site evaluation (results of sites to the
        # server, submitted models and results to the persistor) under least privilege too
        sub = run("submit", str(JOBS / "hello-numpy-cross-val"))
        assert sub.returncode == 0, sub.stdout + sub.stderr + logs()
        job_id = sub.stdout.strip()
        w = run("wait", job_id, "--timeout", "120", timeout=180)
        assert w.returncode == 0, w.stdout + w.stderr + logs()
        d = run("download", job_id, "--out", str(tmp_path / "dl"))
        assert d.returncode == 0, d.stdout + d.stderr + logs()
        np.testing.assert_array_equal(np.load(tmp_path / "dl" / "models" / "server.npy"), FINAL)
        cross = json.loads((tmp_path / "dl" / "cross_site_val" / "cross_val_results.json").read_text())
        assert {c: sorted(r) for c, r in cross.items()} == {s: ["SRV_server", *SITES] for s in SITES}, cross
        dl = run("dead", "list")
        assert dl.returncode == 0 and "no dead-lettered messages" in dl.stdout, dl.stdout + dl.stderr
        # nobody was refused anything, and no message was dead-lettered
        with open(broker_log, "rb") as f:
            f.seek(log_start)
            during = f.read().decode(errors="replace")
        assert "authenticated and granted access to vhost 'sagmq'" in during
        for bad in ("channel exception", "refused for user", "access_refused", "precondition_failed"):
            assert bad not in during, during
        dead = {q["name"]: q["messages"] for q in json.loads(prov.node.ctl(
            "list_queues", "-p", VHOST, "name", "messages", "--formatter", "json").stdout)}
        assert dead[N.dead_queue] == 0, logs()
        for p in stack.procs:
            assert "ACCESS_REFUSED" not in p.tail(100000) and "PRECONDITION_FAILED" not in p.tail(100000), logs()
        for p in stack.procs:
            if p.name in SITES:  # rounds 0 and 1 were forwarded; round 2's aggregate is only saved
                assert p.tail(100000).count("held as the next model") == 2, logs()
    finally:
        stack.stop_all()
