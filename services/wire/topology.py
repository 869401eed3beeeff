"""The one declaration of sagmq's exchanges, queues and bindings (prefix P, default ``sag``).

Who publishes what, and who consumes it::

    server ──task (rk=<site>, CC=<other targets>)──▶ P.tasks (direct) ──▶ P.site.<site> ──▶ client
    aggregator ──round.aggregated, CC aggregate.<site> (forwarded model)──▶ P.events ──▶ P.site.<site>
    server ──control (abort / shutdown)───────────▶ P.tasks           ──▶ P.site.<site> ──▶ client
    client ──result (rk=result)───────────────────▶ P.results (direct) ─▶ P.results ────▶ aggregator
    client ──result of a cross-site task (rk=result.server) ─▶ P.results ─▶ P.server ───▶ server
    everyone ─events (topic)──────────────────────▶ P.events
        round.open, round.close, job.<status>, control.aggregator|all ──▶ P.aggregator ─▶ aggregator
        contribution, round.aggregated, model.loaded, model.saved,
        client.heartbeat                                          ──▶ P.server ─────▶ server
        model.load, model.save, job.<status>, control.persistor|all  ──▶ P.persistor ──▶ persistor
        cross_val.save (submitted models, the results matrix)   ──▶ P.persistor ──▶ persistor
    sagmq CLI ──admin.request (rk=server|persistor, reply_to)───▶ P.admin (direct)
        ──▶ P.server.admin ──▶ server;  ──▶ P.persistor ──▶ persistor;  replies via direct reply-to
    any consumer ──a message it cannot process, with the reason──▶ P.dead (fanout) ──▶ P.dead

Every queue is durable; every work queue dead-letters to P.dead. P.dead itself is bounded (at most
SAGMQ_DEAD_MAX_LENGTH messages and SAGMQ_DEAD_MAX_BYTES, the oldest dropped first; each kept
SAGMQ_DEAD_TTL_S at most), so a flood of junk cannot fill the broker. P.server.admin does not
dead-letter: an admin request carries the CLI's timeout as its expiration, and one that expires (the
server was down) is waited for by nobody, so the broker drops it.

Queue arguments are fixed when a queue is created: declaring other ones on an existing queue fails
with PRECONDITION_FAILED. Queues whose arguments changed since the first release (``Queue.tolerant``:
P.dead, P.server.admin) are used as they are then, and ``arguments_advice`` tells the operator how to
apply the new ones.

Site queues (P.site.<site>, tolerant too) expire: a queue no site consumes nor redeclares for
SAGMQ_SITE_QUEUE_EXPIRES_S (default a day; 0: never) is deleted by the broker with what it holds, so
the queues of sites that are gone (scaled-away containers) do not pile up, each holding a forwarded
model for ever. A live site redeclares its queue at every connect, which restarts the count.

SAGMQ_QUEUE_TYPE=quorum makes every durable queue a quorum queue (replicated on a cluster). Quorum
queues (RabbitMQ 3.10) take dead-lettering, x-max-length/-bytes with drop-head, x-message-ttl and
x-expires, but no x-queue-version (a classic queue's storage), no priorities and no exclusive,
auto-delete or non-durable queue: P.dead drops x-queue-version, and a site's name claim
(P.claim.<site>, exclusive, see sagmq.client.claim) stays classic.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from sagmq.wire.settings import Settings

DIRECT, TOPIC, FANOUT = "direct", "topic", "fanout"


@dataclass(frozen=True, slots=True)
class Exchange:
    """An exchange to declare."""

    name: str
    type: str


@dataclass(frozen=True, slots=True)
class Queue:
    """A queue to declare, with its arguments."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    # an existing queue declared with other arguments (an older sagmq, other settings) is used as it is
    tolerant: bool = False


@dataclass(frozen=True, slots=True)
class Binding:
    """A binding of a queue to an exchange with a routing key (pattern)."""

    queue: str
    exchange: str
    routing_key: str


@dataclass(frozen=True, slots=True)
class Topology:
    """What declare() creates."""

    exchanges: tuple[Exchange, ...]
    queues: tuple[Queue, ...]
    bindings: tuple[Binding, ...]


@dataclass(frozen=True, slots=True)
class Names:
    """Every exchange and queue name, derived from the prefix."""

    prefix: str

    @property
    def tasks(self) -> str:
        """The direct exchange of tasks and control to the sites (rk=site, CC=other targets)."""
        return f"{self.prefix}.tasks"

    @property
    def results(self) -> str:
        """The exchange sites publish results to."""
        return f"{self.prefix}.results"

    @property
    def events(self) -> str:
        """The topic exchange of events between the services."""
        return f"{self.prefix}.events"

    @property
    def admin(self) -> str:
        """The exchange of admin requests from the CLI."""
        return f"{self.prefix}.admin"

    @property
    def dead(self) -> str:
        """The dead-letter exchange every work queue rejects to."""
        return f"{self.prefix}.dead"

    @property
    def server_queue(self) -> str:
        """The server's queue of events (contributions, aggregates, models, heartbeats)."""
        return f"{self.prefix}.server"

    @property
    def server_admin_queue(self) -> str:
        """The server's queue of admin requests."""
        return f"{self.prefix}.server.admin"

    @property
    def aggregator_queue(self) -> str:
        """The aggregator's queue of round orders."""
        return f"{self.prefix}.aggregator"

    @property
    def persistor_queue(self) -> str:
        """The persistor's queue: model and job events, and its admin requests."""
        return f"{self.prefix}.persistor"

    @property
    def results_queue(self) -> str:
        """The queue of the sites' results, read by the aggregator."""
        return f"{self.prefix}.results"

    @property
    def dead_queue(self) -> str:
        """The queue dead-lettered messages end in."""
        return f"{self.prefix}.dead"

    def site_queue(self, site: str) -> str:
        """The queue a site reads its tasks and control messages from."""
        return f"{self.prefix}.site.{site}"

    def claim_queue(self, site: str) -> str:
        """The exclusive queue whose owner holds the site name (sagmq.client.claim)."""
        return f"{self.prefix}.claim.{site}"


# Routing keys on the events exchange.
RK_RESULT = "result"
RK_RESULT_SERVER = "result.server"  # (on P.results) a site's answer to a cross-site evaluation task
RK_CROSS_VAL_SAVE = "cross_val.save"
RK_ROUND_OPEN = "round.open"
RK_ROUND_CLOSE = "round.close"
RK_CONTRIBUTION = "contribution"
RK_ROUND_AGGREGATED = "round.aggregated"
RK_ROUND_AGGREGATED_SAVE = "round.aggregated.save"  # an aggregate that will be the saved model
RK_MODEL_COMMIT = "model.commit"
RK_MODEL_LOAD = "model.load"
RK_MODEL_LOADED = "model.loaded"
RK_MODEL_SAVE = "model.save"
RK_MODEL_SAVED = "model.saved"
RK_HEARTBEAT = "client.heartbeat"
RK_ADMIN_SERVER = "server"
RK_ADMIN_PERSISTOR = "persistor"


def rk_job(status: str) -> str:
    """Routing key of a job status event."""
    return f"job.{status}"


def rk_aggregate(site: str) -> str:
    """Routing key (a CC of round.aggregated) that puts an aggregate in a site's queue."""
    return f"aggregate.{site}"


def rk_control(target: str) -> str:
    """Routing key of a control message for 'aggregator', 'persistor' or 'all'."""
    return f"control.{target}"


def work_queue_arguments(names: Names, settings: Settings | None = None) -> dict[str, Any]:
    """Arguments of every work queue: of the type settings say (classic by default), dead-lettered to P.dead."""
    return {"x-queue-type": (settings or Settings()).queue_type, "x-dead-letter-exchange": names.dead}


def site_queue_arguments(names: Names, settings: Settings | None = None) -> dict[str, Any]:
    """A site queue's: a work queue's, and x-expires unless SAGMQ_SITE_QUEUE_EXPIRES_S is 0."""
    s = settings or Settings()
    args = work_queue_arguments(names, s)
    if s.site_queue_expires_s > 0:
        args["x-expires"] = max(1, round(s.site_queue_expires_s * 1000))
    return args


def dead_queue_arguments(settings: Settings) -> dict[str, Any]:
    """P.dead's bounds: a length and a size in bytes (the oldest messages dropped first to keep within
    them) and an age, each left out at 0. Version 2 of classic queues (RabbitMQ 3.10+) confirms a
    persistent message in about half the time (0.6 against 1.2 ms measured here): a flood is
    dead-lettered one confirmed copy at a time, so that halves the delay junk adds to a round."""
    args: dict[str, Any] = {"x-queue-type": "classic", "x-queue-version": 2}
    if settings.queue_type == "quorum":  # (x-queue-version is a classic queue's storage format)
        args = {"x-queue-type": "quorum"}
    if settings.dead_max_length > 0:
        args["x-max-length"] = settings.dead_max_length
    if settings.dead_max_bytes > 0:
        args["x-max-length-bytes"] = settings.dead_max_bytes
    if settings.dead_max_length > 0 or settings.dead_max_bytes > 0:
        args["x-overflow"] = "drop-head"
    if settings.dead_ttl_s > 0:
        args["x-message-ttl"] = max(1, round(settings.dead_ttl_s * 1000))
    return args


def arguments_advice(queue: Queue, refusal: str) -> str:
    """The one line logged when the broker refuses a tolerant queue's arguments (PRECONDITION_FAILED
    on an existing queue): it is used as it is, and how to apply the new arguments."""
    policy = {k.removeprefix("x-"): v for k, v in queue.arguments.items()
              if k in ("x-max-length", "x-max-length-bytes", "x-overflow", "x-message-ttl", "x-expires")}
    how = (f"or apply them as a policy: rabbitmqctl set_policy {queue.name}-bounds '^{re.escape(queue.name)}$' "
           f"'{json.dumps(policy)}' --apply-to queues") if policy else "(it then comes back with them)"
    return (f"queue {queue.name} exists with other arguments than {queue.arguments} ({refusal}); using it as it "
            f"is. To apply them, delete it when nothing in it is needed (rabbitmqctl delete_queue {queue.name}) "
            f"and restart a service that declares it, {how}")


def service_topology(prefix: str, settings: Settings | None = None) -> Topology:
    """Everything but the per-site queues; P.dead bounded as settings say (the defaults without them)."""
    n = Names(prefix)
    args = work_queue_arguments(n, settings)
    dead_args = dead_queue_arguments(settings or Settings())
    exchanges = (
        Exchange(n.tasks, DIRECT),
        Exchange(n.results, DIRECT),
        Exchange(n.events, TOPIC),
        Exchange(n.admin, DIRECT),
        Exchange(n.dead, FANOUT),
    )
    queues = (
        Queue(n.results_queue, args),
        Queue(n.server_queue, args),
        Queue(n.server_admin_queue, {"x-queue-type": (settings or Settings()).queue_type},  # expired requests
              tolerant=True),  # dropped
        Queue(n.aggregator_queue, args),
        Queue(n.persistor_queue, args),
        Queue(n.dead_queue, dead_args, tolerant=True),
    )
    ev = n.events
    bindings = [Binding(n.results_queue, n.results, RK_RESULT), Binding(n.dead_queue, n.dead, ""),
                Binding(n.server_queue, n.results, RK_RESULT_SERVER)]
    for rk in (RK_CONTRIBUTION, RK_ROUND_AGGREGATED, RK_ROUND_AGGREGATED_SAVE, RK_MODEL_LOADED, RK_MODEL_SAVED,
               RK_HEARTBEAT):
        bindings.append(Binding(n.server_queue, ev, rk))
    for rk in (RK_ROUND_OPEN, RK_ROUND_CLOSE, "job.*", rk_control("aggregator"), rk_control("all")):
        bindings.append(Binding(n.aggregator_queue, ev, rk))
    for rk in (RK_MODEL_LOAD, RK_MODEL_SAVE, RK_MODEL_COMMIT, RK_ROUND_AGGREGATED_SAVE, "job.*",
               rk_control("persistor"), rk_control("all"), RK_CROSS_VAL_SAVE):
        bindings.append(Binding(n.persistor_queue, ev, rk))
    bindings.append(Binding(n.server_admin_queue, n.admin, RK_ADMIN_SERVER))
    bindings.append(Binding(n.persistor_queue, n.admin, RK_ADMIN_PERSISTOR))
    return Topology(exchanges, queues, tuple(bindings))


def site_topology(prefix: str, site: str, settings: Settings | None = None) -> Topology:
    """A site's own queue, bound to the tasks exchange under its name (tasks, control) and to the
    events exchange as aggregate.<site> (aggregates forwarded as its next model), and the exchanges
    it publishes to. The queue is tolerant: one of an older deployment (no x-expires) is used as it is."""
    n = Names(prefix)
    q = n.site_queue(site)
    return Topology(
        exchanges=(Exchange(n.tasks, DIRECT), Exchange(n.results, DIRECT), Exchange(n.events, TOPIC),
                   Exchange(n.dead, FANOUT)),
        queues=(Queue(q, site_queue_arguments(n, settings), tolerant=True),),
        bindings=(Binding(q, n.tasks, site), Binding(q, n.events, rk_aggregate(site))),
    )
