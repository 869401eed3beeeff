"""`sagmq provision`: RabbitMQ definitions (vhost, users, least-privilege permissions, topology) and env files.

With ``--tls`` it also writes OUT/tls (``sagmq.cli.tls``): a CA, the broker's certificate and
one client certificate per user, a rabbitmq.conf snippet for the TLS listener, and env files whose
SAGMQ_TLS_* point at the files as mounted in a container (``--tls-dir``, default /etc/sagmq/tls).
The admin user has the ``monitoring`` tag, so it can log in to the management UI (read-only).
Site queues are defined without x-expires: a provisioned site may not declare (so could not
re-create) its queue, which must therefore never expire.

``build_definitions`` is pure (no I/O): it derives every exchange, queue and binding from
``sagmq.wire.topology`` and computes each user's permissions from what that user's code does on
the wire (the ``*_ops`` functions below mirror the ``publish``/``consume``/``declare`` calls of the
services).  ``write_provision`` writes ``definitions.json`` (for ``rabbitmqctl import_definitions``
or ``load_definitions``), ``sites/<site>.env`` and ``services/<service>.env``, all mode 0600.

How RabbitMQ 3.10 authorises the AMQP operations sagmq uses (rabbit_channel):

    operation                                   permission checked
    ------------------------------------------  -----------------------------------------------------
    exchange.declare X                          configure X
    queue.declare Q                             configure Q
      ... with x-dead-letter-exchange D         + read Q, write D
    queue.bind Q to X with key K                write Q, read X; + topic read K if X is a topic exchange
    basic.publish to X with key K               write X ("" is amq.default); + topic write K if X is topic
    basic.publish with user_id U                U must be the connection's user (406 otherwise)
    basic.consume / basic.get Q                 read Q
    basic.consume amq.rabbitmq.reply-to         nothing (a pseudo-queue; tested in tests/security)
    connect to the vhost                        any permission entry on the vhost

Permission table (P = the prefix, regex-escaped in the definitions; every regex is anchored ^...$
because RabbitMQ matches unanchored; "-" means ^$, i.e. nothing):

    user        configure          write                               read
    ----------  -----------------  ----------------------------------  ------------------------------------
    <site S>    -                  P.results  (result)                 P.site.S (its tasks)
                                   P.events   (heartbeat)
                                   P.dead     (dead-letters a task)
    server      every exchange     P.tasks, P.events, P.dead,          P.server, P.server.admin (consumes);
                and queue of       amq.default (RPC replies);          P.results, P.aggregator, P.persistor
                service_topology   every service queue (queue.bind)    (queue.declare with DLX);
                (it declares it)                                       P.results, P.events, P.admin, P.dead
                                                                       exchanges (queue.bind)
    aggregator  same as server     P.events, P.dead;                   P.aggregator, P.results (consumes);
                                   every service queue (queue.bind)    the rest as server (declare + bind)
    persistor   -                  P.events, P.dead, amq.default       P.persistor
    admin       -                  P.admin                             P.dead (`sagmq dead list|show`: basic.get,
                                                                       requeued); direct reply-to needs none

    Topic permissions on P.events (the only topic exchange):
    user        write (routing keys it publishes)                      read (binding keys it binds)
    ----------  -----------------------------------------------------  ----------------------------------
    <site S>    client.heartbeat                                        -
    server      job.<status>, model.load, model.save, model.commit,     every binding key on P.events
                round.open, round.close, control.all                    (it declares the bindings)
    aggregator  round.aggregated, round.aggregated.save, contribution,  every binding key on P.events
                aggregate.<S> for every site S (CC: the forwarded model)
    persistor   model.loaded, model.saved                               -
    admin       -                                                       -

Residual risks, inherent to AMQP 0-9-1 rather than to these regexes:
  * write on amq.default (server, persistor: needed to answer over direct reply-to) lets that user
    publish into any queue of the vhost by naming it as routing key; receivers see the true user_id
    (the broker enforces it), and the aggregator checks user_id on results.
  * server and aggregator declare the whole service topology (SAGMQ_DECLARE=1), so they must hold
    configure (hence delete) on it, and read on the dead-lettered queues they declare.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sagmq.wire.errors import ConfigError
from sagmq.wire.messages import JOB_STATUSES
from sagmq.wire.settings import Settings, check_name
from sagmq.wire.topology import (
    RK_ADMIN_PERSISTOR,
    RK_ADMIN_SERVER,
    RK_CONTRIBUTION,
    RK_CROSS_VAL_SAVE,
    RK_HEARTBEAT,
    RK_MODEL_COMMIT,
    RK_MODEL_LOAD,
    RK_MODEL_LOADED,
    RK_MODEL_SAVE,
    RK_MODEL_SAVED,
    RK_ROUND_AGGREGATED,
    RK_ROUND_AGGREGATED_SAVE,
    RK_ROUND_CLOSE,
    RK_ROUND_OPEN,
    TOPIC,
    Names,
    Topology,
    rk_aggregate,
    rk_control,
    rk_job,
    service_topology,
    site_topology,
)

RABBIT_VERSION = "3.10.8"
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
DEFAULT_EXCHANGE = "amq.default"  # how permissions name the nameless default exchange
REPLY_TO = "amq.rabbitmq.reply-to"  # the direct reply-to pseudo-queue the admin CLI consumes
SERVICE_USERS = ("server", "aggregator", "persistor", "admin")
DECLARING_SERVICES = ("server", "aggregator")  # SAGMQ_DECLARE=1: they (re)declare service_topology
RESERVED_USERS = (*SERVICE_USERS, "guest")  # a site named like these would take over that user
NOTHING = "^$"
USER_TAGS = {"admin": "monitoring"}  # the management UI (read-only views) for the admin user
TLS_FILE_STEMS = ("ca", "broker")  # OUT/tls/ca.pem, broker.pem: no user may be named so with --tls


# --- what each user does on the wire ------------------------------------------------------------


@dataclass(slots=True)
class Access:
    """Resources one user touches, per permission kind; topic keys per topic exchange."""

    topic_exchanges: frozenset[str]
    configure: set[str] = field(default_factory=set)
    write: set[str] = field(default_factory=set)
    read: set[str] = field(default_factory=set)
    topic_write: dict[str, set[str]] = field(default_factory=dict)
    topic_read: dict[str, set[str]] = field(default_factory=dict)

    def declare(self, topo: Topology) -> None:
        """What Bus._declare needs: exchange.declare, queue.declare (with DLX) and queue.bind."""
        for ex in topo.exchanges:
            self.configure.add(ex.name)
        for q in topo.queues:
            self.configure.add(q.name)
            dlx = q.arguments.get("x-dead-letter-exchange")
            if dlx is not None:
                self.read.add(q.name)
                self.write.add(dlx)
        for b in topo.bindings:
            self.write.add(b.queue)
            self.read.add(b.exchange)
            if b.exchange in self.topic_exchanges:
                self.topic_read.setdefault(b.exchange, set()).add(b.routing_key)

    def publish(self, exchange: str, *routing_keys: str) -> None:
        """basic.publish; routing keys matter only on topic exchanges."""
        self.write.add(exchange or DEFAULT_EXCHANGE)
        if exchange in self.topic_exchanges:
            self.topic_write.setdefault(exchange, set()).update(routing_keys)

    def consume(self, queue: str) -> None:
        """basic.consume (the direct reply-to pseudo-queue needs no permission)."""
        if queue != REPLY_TO:
            self.read.add(queue)


def _new_access(prefix: str) -> Access:
    topo = service_topology(prefix)
    return Access(frozenset(ex.name for ex in topo.exchanges if ex.type == TOPIC))


def site_ops(prefix: str, site: str) -> Access:
    """services/client: consume its queue, publish results and heartbeats, dead-letter bad tasks."""
    n, a = Names(prefix), _new_access(prefix)
    a.consume(n.site_queue(site))
    a.publish(n.results)
    a.publish(n.events, RK_HEARTBEAT)
    a.publish(n.dead)
    return a


def server_ops(prefix: str) -> Access:
    """services/server: declares the service topology, consumes events and admin requests."""
    n, a = Names(prefix), _new_access(prefix)
    a.declare(service_topology(prefix))
    a.consume(n.server_queue)
    a.consume(n.server_admin_queue)
    a.publish(n.tasks)  # tasks and control messages, routing key = site
    a.publish(n.events, *(rk_job(s) for s in JOB_STATUSES), RK_MODEL_LOAD, RK_MODEL_SAVE, RK_MODEL_COMMIT,
              RK_ROUND_OPEN, RK_ROUND_CLOSE, rk_control("all"), RK_CROSS_VAL_SAVE)
    a.publish("")  # admin replies over direct reply-to
    a.publish(n.dead)
    return a


def aggregator_ops(prefix: str, sites: Sequence[str] = ()) -> Access:
    """services/aggregator: declares the service topology, consumes round control and results, and
    forwards aggregates to sites (CC aggregate.<site>; RabbitMQ 4 checks topic permissions on CC keys)."""
    n, a = Names(prefix), _new_access(prefix)
    a.declare(service_topology(prefix))
    a.consume(n.aggregator_queue)
    a.consume(n.results_queue)
    a.publish(n.events, RK_ROUND_AGGREGATED, RK_ROUND_AGGREGATED_SAVE, RK_CONTRIBUTION,
              *(rk_aggregate(s) for s in sites))
    a.publish(n.dead)
    return a


def persistor_ops(prefix: str) -> Access:
    """services/persistor: consumes its queue (events and download requests), answers, dead-letters."""
    n, a = Names(prefix), _new_access(prefix)
    a.consume(n.persistor_queue)
    a.publish(n.events, RK_MODEL_LOADED, RK_MODEL_SAVED)
    a.publish("")  # download replies over direct reply-to
    a.publish(n.dead)
    return a


def admin_ops(prefix: str) -> Access:
    """services/cli: admin RPC to the server or the persistor (replies over direct reply-to), and
    `sagmq dead list|show`, which browses P.dead with basic.get (messages requeued, never acked)."""
    n, a = Names(prefix), _new_access(prefix)
    a.publish(n.admin, RK_ADMIN_SERVER, RK_ADMIN_PERSISTOR)
    a.consume(REPLY_TO)
    a.consume(n.dead_queue)
    return a


def user_access(prefix: str, sites: Sequence[str]) -> dict[str, Access]:
    """Every provisioned user and what it needs."""
    users = {site: site_ops(prefix, site) for site in sites}
    users.update(server=server_ops(prefix), aggregator=aggregator_ops(prefix, sites), persistor=persistor_ops(prefix),
                 admin=admin_ops(prefix))
    return users


# --- definitions --------------------------------------------------------------------------------


def anchored(names: Iterable[str]) -> str:
    """An anchored regex matching exactly these names (^$ for none)."""
    alts = sorted({re.escape(x) for x in names})
    if not alts:
        return NOTHING
    return f"^{alts[0]}$" if len(alts) == 1 else "^(?:" + "|".join(alts) + ")$"


def hash_password(password: str, salt: bytes | None = None) -> str:
    """rabbit_password_hashing_sha256: base64(salt4 + sha256(salt4 + utf8 password))."""
    salt = secrets.token_bytes(4) if salt is None else salt
    if len(salt) != 4:
        raise ValueError("RabbitMQ password salts are 4 bytes")
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode("utf-8")).digest()).decode("ascii")


def check_password(password: str, password_hash: str) -> bool:
    """Whether a rabbit_password_hashing_sha256 hash is this password's."""
    raw = base64.b64decode(password_hash)
    return secrets.compare_digest(hash_password(password, raw[:4]), password_hash)


def check_sites(sites: Sequence[str]) -> list[str]:
    """Validate site names: sagmq names, distinct, none taking a service's (or guest's) user."""
    if not sites:
        raise ConfigError("provision needs at least one site")
    out: list[str] = []
    for site in sites:
        check_name("site", site)
        if site in RESERVED_USERS:
            raise ConfigError(f"site {site!r} would share the broker user of the {site} "
                              f"(site names must differ from {', '.join(RESERVED_USERS)})")
        if site in out:
            raise ConfigError(f"site {site!r} is listed twice")
        out.append(site)
    return out


def all_users(sites: Sequence[str]) -> list[str]:
    """Every broker user: one per site, then the services'."""
    return [*sites, *SERVICE_USERS]


def build_definitions(sites: Sequence[str], prefix: str, vhost: str,
                      passwords: Mapping[str, str]) -> dict[str, Any]:
    """RabbitMQ definitions for the vhost: users, permissions, topic permissions and the topology."""
    sites = check_sites(sites)
    check_name("prefix", prefix)
    if not vhost:
        raise ConfigError("the vhost name must not be empty")
    users = all_users(sites)
    missing = [u for u in users if not passwords.get(u)]
    if missing:
        raise ConfigError(f"no password for {', '.join(missing)}")
    access = user_access(prefix, sites)

    never = Settings(site_queue_expires_s=0)  # a site without configure permission could not re-create it
    topologies = [service_topology(prefix), *(site_topology(prefix, s, never) for s in sites)]
    exchanges: dict[str, dict[str, Any]] = {}
    queues: dict[str, dict[str, Any]] = {}
    bindings: dict[tuple[str, str, str], dict[str, Any]] = {}
    for topo in topologies:
        for ex in topo.exchanges:
            exchanges.setdefault(ex.name, {"name": ex.name, "vhost": vhost, "type": ex.type, "durable": True,
                                           "auto_delete": False, "internal": False, "arguments": {}})
        for q in topo.queues:
            queues.setdefault(q.name, {"name": q.name, "vhost": vhost, "durable": True, "auto_delete": False,
                                       "arguments": dict(q.arguments)})
        for b in topo.bindings:
            bindings.setdefault((b.exchange, b.queue, b.routing_key), {
                "source": b.exchange, "vhost": vhost, "destination": b.queue, "destination_type": "queue",
                "routing_key": b.routing_key, "arguments": {}})
    topic_exchanges = sorted(name for name, ex in exchanges.items() if ex["type"] == TOPIC)

    return {
        "rabbit_version": RABBIT_VERSION,
        "rabbitmq_version": RABBIT_VERSION,
        "product_name": "RabbitMQ",
        "product_version": RABBIT_VERSION,
        "users": [{"name": u, "password_hash": hash_password(passwords[u]), "hashing_algorithm": HASHING_ALGORITHM,
                   "tags": USER_TAGS.get(u, ""), "limits": {}} for u in users],
        "vhosts": [{"name": vhost}],
        "permissions": [{"user": u, "vhost": vhost, "configure": anchored(access[u].configure),
                         "write": anchored(access[u].write), "read": anchored(access[u].read)} for u in users],
        "topic_permissions": [{"user": u, "vhost": vhost, "exchange": ex,
                               "write": anchored(access[u].topic_write.get(ex, ())),
                               "read": anchored(access[u].topic_read.get(ex, ()))}
                              for u in users for ex in topic_exchanges],
        "parameters": [],
        "global_parameters": [],
        "policies": [],
        "exchanges": list(exchanges.values()),
        "queues": list(queues.values()),
        "bindings": list(bindings.values()),
    }


# --- env files ----------------------------------------------------------------------------------


def amqp_url(user: str, password: str, host: str, port: int, vhost: str, tls: bool) -> str:
    """The SAGMQ_AMQP_URL of one user (user, password and vhost url-quoted)."""
    h = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return (f"{'amqps' if tls else 'amqp'}://{quote(user, safe='')}:{quote(password, safe='')}@{h}:{port}/"
            f"{quote(vhost, safe='')}")


def env_text(user: str, password: str, prefix: str, vhost: str, host: str, port: int, tls: bool,
             site: str = "", tls_dir: str = "") -> str:
    """The .env file of a site (site given) or a service."""
    what = f"site {site}" if site else f"the {user}"
    declare = "1" if user in DECLARING_SERVICES else "0"
    lines = [f"# sagmq environment of {what}; written by `sagmq provision`. Secret: keep it mode 0600.",
             f"SAGMQ_AMQP_URL={amqp_url(user, password, host, port, vhost, tls)}",
             f"SAGMQ_PREFIX={prefix}"]
    if site:
        lines.append(f"SAGMQ_SITE={site}")
    lines.append(f"SAGMQ_DECLARE={declare}")
    if tls and tls_dir:
        d = tls_dir.rstrip("/")
        lines += [f"# TLS: the files of OUT/tls mounted at {d} (ca.pem, {user}.pem, {user}.key only).",
                  f"SAGMQ_TLS_CA_FILE={d}/ca.pem",
                  f"SAGMQ_TLS_CERT_FILE={d}/{user}.pem",
                  f"SAGMQ_TLS_KEY_FILE={d}/{user}.key",
                  f"SAGMQ_TLS_SERVER_NAME={host}"]
    elif tls:
        lines += ["# TLS: the CA that signed the broker's certificate, and this user's client certificate if the",
                  "# broker verifies peers (fail_if_no_peer_cert).",
                  "# SAGMQ_TLS_CA_FILE=/path/to/ca.pem",
                  f"# SAGMQ_TLS_CERT_FILE=/path/to/{user}.crt",
                  f"# SAGMQ_TLS_KEY_FILE=/path/to/{user}.key",
                  f"# SAGMQ_TLS_SERVER_NAME={host}"]
    return "\n".join(lines) + "\n"


def parse_env(text: str) -> dict[str, str]:
    """KEY=VALUE lines of an env file (comments and blank lines skipped)."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            if sep:
                env[key.strip()] = value.strip()
    return env


def _write_secret(path: Path, text: str) -> None:
    """Create or replace a file readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file that already exists
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def write_provision(out_dir: Path | str, sites: Sequence[str], prefix: str = "sag", vhost: str = "sagmq",
                    host: str = "localhost", port: int | None = None, tls: bool = False,
                    force: bool = False, tls_dir: str = "", broker_names: Sequence[str] = ()) -> None:
    """Write definitions.json, sites/<site>.env and services/<service>.env with fresh passwords; with tls
    and a tls_dir (where containers find the files), OUT/tls's certificates too (see sagmq.cli.tls)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} is not empty; use --force to overwrite the files in it")
    port = (5671 if tls else 5672) if port is None else port
    if not 0 < port < 65536:
        raise ConfigError(f"port {port} is out of range")
    sites = check_sites(sites)
    clash = [s for s in sites if s in TLS_FILE_STEMS]
    if tls and tls_dir and clash:
        raise ConfigError(f"with --tls, no site may be named {' or '.join(TLS_FILE_STEMS)} (their files): {clash}")
    passwords = {u: secrets.token_urlsafe(32) for u in all_users(sites)}
    definitions = build_definitions(sites, prefix, vhost, passwords)

    for d in (out, out / "sites", out / "services"):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_secret(out / "definitions.json", json.dumps(definitions, indent=2) + "\n")
    for site in sites:
        _write_secret(out / "sites" / f"{site}.env",
                      env_text(site, passwords[site], prefix, vhost, host, port, tls, site=site, tls_dir=tls_dir))
    for svc in SERVICE_USERS:
        _write_secret(out / "services" / f"{svc}.env",
                      env_text(svc, passwords[svc], prefix, vhost, host, port, tls, tls_dir=tls_dir))
    if tls and tls_dir:
        try:
            from sagmq.cli.tls import write_tls
        except ImportError as e:
            raise ConfigError(f"sagmq provision --tls needs the cryptography package: pip install 'sagmq[tls]' "
                              f"({e})") from e
        write_tls(out, all_users(sites), [host, *(n for n in broker_names if n != host)], port)
