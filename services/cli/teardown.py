"""`sagmq teardown`: delete a prefix's exchanges and queues (and what they hold).

Refused while the server runs a job, unless ``--force``. The names come from the management API
where it is readable (every exchange and queue named ``<prefix>.*``); else from the topology
(the services' queues and exchanges) and the sites the server knows, deleted over AMQP.
"""

from __future__ import annotations

from typing import Any

from sagmq.cli.admin import CLI_CONNECT_S, AdminClient
from sagmq.cli.status import management_list
from sagmq.wire.errors import SagmqError
from sagmq.wire.settings import Settings
from sagmq.wire.topology import Names, service_topology


def _management_names(s: Settings) -> tuple[list[str], list[str]] | None:
    """(queues, exchanges) of the prefix from the management API, or None when it cannot be read."""
    try:
        queues = management_list(s, "queues", "name")
        exchanges = management_list(s, "exchanges", "name")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    mine = f"{s.prefix}."
    return ([q["name"] for q in queues if str(q.get("name", "")).startswith(mine)],
            [x["name"] for x in exchanges if str(x.get("name", "")).startswith(mine)])


def _topology_names(s: Settings, sites: list[str]) -> tuple[list[str], list[str]]:
    topo, names = service_topology(s.prefix, s), Names(s.prefix)
    return ([q.name for q in topo.queues] + [names.site_queue(x) for x in sites],
            [x.name for x in topo.exchanges])


def _server_state(admin: AdminClient) -> dict[str, Any] | None:
    """The server's status if a server consumes its admin queue, else None."""
    if admin.consumers(admin.bus.names.server_admin_queue) == 0:
        return None
    return admin.status()


def run_teardown(s: Settings, force: bool) -> int:
    """Delete the prefix's queues and exchanges; refuse while a job runs unless force."""
    admin = AdminClient(s, CLI_CONNECT_S)
    try:
        server = _server_state(admin)
        if server and server.get("running") and not force:
            raise SagmqError(f"job {server['running']} is running on prefix {s.prefix}: abort it first "
                             f"(`sagmq abort {server['running'][:8]}`) or use `sagmq teardown --force`")
        found = _management_names(s)
        queues, exchanges = found or _topology_names(s, [x["site"] for x in (server or {}).get("sites", [])])
        deleted_q, deleted_x = 0, 0
        ch = admin.bus.channel
        for q in queues:
            if admin.queue_depth(q) is not None:
                ch.queue_delete(q)
                deleted_q += 1
        for x in exchanges:
            try:
                ch.exchange_delete(x)
                deleted_x += 1
            except Exception as e:  # pika's ChannelClosedByBroker; only the bus may import pika
                if getattr(e, "reply_code", None) != 404:
                    raise
    finally:
        admin.close()
    how = "listed by the management API" if found is not None else "from the topology and the known sites"
    print(f"teardown of prefix {s.prefix}: deleted {deleted_q} queue(s) and {deleted_x} exchange(s) ({how})")
    if server:
        print("the services of this prefix are still running: stop them (`sagmq shutdown all`) or they declare "
              "their queues again when they reconnect")
    return 0

