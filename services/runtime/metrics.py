"""Prometheus metrics of a sagmq service: what it counts, and the HTTP endpoint that serves them.

Every bus has a Meter (``AmqpBus.meter``; ``meter_of(bus)`` finds it, or makes one for a bus
without, like the in-memory bus). The bus counts what crosses it: messages and body bytes sent
and received by message kind, dead letters by reason, reconnects. The server also has the Meter
follow its running job (``Meter.follow``) and its sites (``Meter.watch_sites``).

Counting is plain Python, a dict look-up and two additions per message, with no lock and no
prometheus_client object on the hot path; the metric families are built only when something
scrapes them, by a collector in a registry of the Meter's own (``Meter.registry()``). So several
services in one process (the tests run them so) never share or register anything twice, and a
process that serves no metrics never builds them. ``serve_metrics`` serves a Meter's registry on
SAGMQ_METRICS_PORT (0, the default: no endpoint).

Every label has a bounded set of values: kind is one of the wire's message types ("other" for
anything else a peer may put in the type property), reason is one of REASONS' labels, phase one of
PHASES, site one of the sites the server has heard from (the deployment's sites). The README's
"Metrics" section has the table of every metric.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import start_wsgi_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from sagmq.wire.errors import ConfigError
from sagmq.wire.messages import BY_TYPE

log = logging.getLogger(__name__)

# the kind label: the wire's message types, "dead" (a dead-letter copy), and "other" for the rest
DEAD = "dead"
OTHER = "other"
KINDS = frozenset([*BY_TYPE, DEAD, OTHER])
SENT, RECEIVED = "sent", "received"

# sagmq_round_seconds: a hello-numpy round takes about 0.02 s on one machine, a large model's minutes
ROUND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0)

# the phase label: ScatterAndGather's phases (sagmq.server.scatter_and_gather.Phase; a unit test keeps
# the two lists equal), and "idle" before the server ran any job
IDLE = "idle"
PHASES = (IDLE, "loading", "waiting", "training", "aggregating", "saving", "done")

# The reason label of dead letters and rejected contributions: the first entry one of whose phrases
# the reason text contains (the texts are the services' own; tests/unit/test_metrics.py holds an
# example of each). Anything else is "other", so a peer's free text never becomes a label value.
REASONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("internal", ("internal error",)),
    ("broker_refused", ("made the broker refuse",)),
    ("sender", ("spoofed sender", "without a user_id", "does not match body site", "not addressed to site")),
    ("wrong_type", ("does not take", "takes result messages, not", "a site queue takes", "unknown control command")),
    ("duplicate", ("duplicate",)),
    ("stale", ("stale", "late:", "not the current task", "which is not open", "no round.open", "did not come within")),
    ("site_error", ("returned rc",)),
    ("not_target", ("not a target",)),
    ("not_finite", ("NaN or Inf",)),
    ("model_mismatch", ("not in the global model", "has shape", "non-numeric dtype", "data kind", "sent no variable",
                        "sent no DXO", "carries no")),
    ("too_large", ("exceeds",)),
    ("incomplete", ("incomplete blob", "without its header", "parts arrived", "blob part", "blob data part")),
    ("disk", ("could not save",)),
    ("meta", ("NUM_STEPS",)),
    ("decode", ("msgpack", "expected a", "dtype", "is missing", "unknown fields", "not a map", "not binary",
                "not a string", "not allowed", "bad shape", "shape ", "cannot encode", "body is not")),
)
REASON_LABELS = (*(label for label, _ in REASONS), OTHER)
ACCEPTED, REJECTED = "accepted", "rejected"


@functools.lru_cache(maxsize=1024)
def reason_label(reason: str) -> str:
    """The bounded label of a dead letter's or a rejected contribution's reason text."""
    for label, phrases in REASONS:
        if any(p in reason for p in phrases):
            return label
    return OTHER


@functools.cache
def version() -> str:
    """The installed sagmq's version ("unknown" when run from a tree that is not installed)."""
    try:
        return importlib.metadata.version("sagmq")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# --- what the server's running job looks like to the meter (ScatterAndGather, read only) ----------------


class _Rejection(Protocol):
    @property
    def reason(self) -> str: ...


class _Record(Protocol):
    @property
    def round(self) -> int: ...
    @property
    def task_id(self) -> str: ...
    @property
    def started_at(self) -> float: ...  # wall time
    @property
    def accepted(self) -> Sequence[str]: ...
    @property
    def rejected(self) -> Sequence[_Rejection]: ...
    @property
    def aggregated(self) -> Sequence[str] | None: ...
    @property
    def seconds(self) -> float | None: ...


class _Config(Protocol):
    @property
    def train_timeout(self) -> float: ...


class RoundsView(Protocol):
    """The parts of a job's ScatterAndGather the meter reads."""

    @property
    def job_id(self) -> str: ...
    @property
    def phase(self) -> str: ...
    @property
    def record(self) -> _Record | None: ...  # the open round
    @property
    def history(self) -> Sequence[_Record]: ...
    @property
    def sag(self) -> _Config: ...


@dataclass(slots=True)
class Histogram:
    """Cumulative-on-read bucket counts (one bisect per observation)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        """Count one value."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """(le, cumulative count) pairs, +Inf last, as Prometheus wants them."""
        out, acc = [], 0
        for le, n in zip([*(repr(float(b)) for b in self.bounds), "+Inf"], list(self.counts)):
            acc += n
            out.append((le, float(acc)))
        return out


@dataclass(slots=True)
class Rounds:
    """The server's rounds and contributions (counted once per round, from its record when the round ends)."""

    started: int = 0
    finished: int = 0
    seconds: Histogram = field(default_factory=lambda: Histogram(ROUND_BUCKETS))
    # (result, reason) -> count; accepted is there from the start (a counter that appears at 1 hides its first rise)
    contributions: dict[tuple[str, str], int] = field(default_factory=lambda: {(ACCEPTED, ""): 0})
    job_id: str = ""
    phase: str = IDLE
    round: int = -1
    started_at: float | None = None  # wall time the open round started
    timeout_s: float = 0.0
    _started_tasks: set[str] = field(default_factory=set)  # rounds of the job followed that started here
    _ended_tasks: set[str] = field(default_factory=set)  # ... and that ended (counted)
    _seen: int = 0  # history[:_seen] was looked at

    def follow(self, view: RoundsView) -> None:
        """Take in the job's state after its rounds moved (the server calls this after each batch of effects)."""
        if view.job_id != self.job_id:  # another job (or the first): its earlier rounds are not counted here
            self.job_id, self._seen = view.job_id, len(view.history)
            self._started_tasks, self._ended_tasks = set(), set()
        self.phase, self.timeout_s = str(view.phase), view.sag.train_timeout
        rec = view.record
        if rec is not None and rec.task_id not in self._started_tasks:
            self._started_tasks.add(rec.task_id)
            self.started += 1
        self.round, self.started_at = (rec.round, rec.started_at) if rec is not None else (-1, None)
        history = view.history
        if len(history) < self._seen:  # replaced by a resumed job's records: none of those is new
            self._seen = len(history)
        for done in history[self._seen:]:
            self._finished(done)
        self._seen = len(history)

    def _finished(self, rec: _Record) -> None:
        """A round's record left the open state: aggregated, or ended with its job (then it is not finished,
        but its verdicts count)."""
        if rec.task_id not in self._started_tasks or rec.task_id in self._ended_tasks:
            return  # one that started before this process (a resumed job's), or seen already
        self._ended_tasks.add(rec.task_id)
        if rec.aggregated is not None:
            self.finished += 1
            if rec.seconds is not None:
                self.seconds.observe(rec.seconds)
        self.count_contribution(ACCEPTED, "", len(rec.accepted))
        for rej in rec.rejected:
            self.count_contribution(REJECTED, reason_label(rej.reason))

    def count_contribution(self, result: str, reason: str, n: int = 1) -> None:
        """Count n contributions of one result and reason label."""
        key = (result, reason)
        self.contributions[key] = self.contributions.get(key, 0) + n


# {site: monotonic time it was last heard from}; called from the scraping thread
SeenAt = Callable[[], Mapping[str, float]]


class Meter:
    """What one service counts (one per bus; see the module docstring)."""

    def __init__(self, service: str, site: str = "") -> None:
        self.service = service
        self.site = site
        self.sent: dict[str, list[int]] = {}  # kind -> [messages, bytes]
        self.received: dict[str, list[int]] = {}
        self.dead_letters = dict.fromkeys(REASON_LABELS, 0)  # reason label -> count, each there from the start
        self.reconnects = 0
        self.rounds: Rounds | None = None  # the server's
        self._seen_at: SeenAt | None = None
        self._client_timeout_s = 0.0
        self._registry: CollectorRegistry | None = None

    # --- counting (the bus's thread) -------------------------------------------------------------

    def count_sent(self, kind: str | None, nbytes: int) -> None:
        """One message (or blob part) published, of body size nbytes."""
        c = self.sent.get(kind or OTHER)
        if c is None:
            c = self.sent.setdefault(kind if kind in KINDS else OTHER, [0, 0])
        c[0] += 1
        c[1] += nbytes

    def count_received(self, kind: str | None, nbytes: int) -> None:
        """One message (or blob part) delivered, of body size nbytes."""
        c = self.received.get(kind or OTHER)
        if c is None:
            c = self.received.setdefault(kind if kind in KINDS else OTHER, [0, 0])
        c[0] += 1
        c[1] += nbytes

    def count_dead_letter(self, reason: str) -> None:
        """One message copied to the dead-letter queue with this reason."""
        label = reason_label(reason)
        self.dead_letters[label] = self.dead_letters.get(label, 0) + 1

    def count_reconnect(self) -> None:
        """The connection was replaced."""
        self.reconnects += 1

    def follow(self, view: RoundsView) -> None:
        """(server) The running job's rounds after a batch of its effects."""
        if self.rounds is None:
            self.rounds = Rounds()
        self.rounds.follow(view)

    def watch_sites(self, seen_at: SeenAt, client_timeout_s: float) -> None:
        """(server) Where to read each site's last heartbeat, when scraped; alive: heard within the timeout."""
        if self.rounds is None:
            self.rounds = Rounds()
        self._seen_at, self._client_timeout_s = seen_at, client_timeout_s

    # --- exposition (the scraping thread) ----------------------------------------------------------

    def registry(self) -> CollectorRegistry:
        """This meter's own registry (made on first use): its metrics and the process's."""
        if self._registry is None:
            reg = CollectorRegistry(auto_describe=True)
            reg.register(_MeterCollector(self))
            ProcessCollector(registry=reg)
            self._registry = reg
        return self._registry

    def families(self) -> Iterator[Metric]:
        """Every sagmq metric family of this meter, as of now."""
        info = GaugeMetricFamily("sagmq_service_info", "The service, its site (clients) and sagmq's version; always 1.",
                                 labels=["service", "site", "version"])
        info.add_metric([self.service, self.site, version()], 1)
        yield info
        yield from self._traffic()
        dead = CounterMetricFamily("sagmq_dead_letters", "Messages this service copied to the dead-letter queue.",
                                   labels=["reason"])
        for label, n in sorted(dict(self.dead_letters).items()):
            dead.add_metric([label], n)
        yield dead
        yield CounterMetricFamily("sagmq_reconnects", "Times the broker connection was replaced.", value=self.reconnects)
        if self.rounds is not None:
            yield from self._round_families(self.rounds)

    def _traffic(self) -> Iterator[Metric]:
        msgs = CounterMetricFamily("sagmq_messages", "AMQP messages (a large message's parts each count) sent and "
                                   "received, by message kind.", labels=["direction", "kind"])
        nbytes = CounterMetricFamily("sagmq_bytes", "Message body bytes sent and received, by message kind.",
                                     labels=["direction", "kind"])
        for direction, table in ((SENT, self.sent), (RECEIVED, self.received)):
            for kind, (n, b) in sorted((k, list(v)) for k, v in dict(table).items()):
                msgs.add_metric([direction, kind], n)
                nbytes.add_metric([direction, kind], b)
        yield msgs
        yield nbytes

    def _round_families(self, r: Rounds) -> Iterator[Metric]:
        yield CounterMetricFamily("sagmq_rounds_started", "Rounds opened (their task sent).", value=r.started)
        yield CounterMetricFamily("sagmq_rounds_finished", "Rounds aggregated.", value=r.finished)
        hist = HistogramMetricFamily("sagmq_round_seconds", "Seconds from a round's opening to its aggregate.")
        hist.add_metric([], r.seconds.buckets(), r.seconds.total)
        yield hist
        contrib = CounterMetricFamily("sagmq_contributions", "Sites' results of finished rounds, accepted, or "
                                      "rejected by reason.", labels=["result", "reason"])
        for (result, reason), n in sorted(dict(r.contributions).items()):
            contrib.add_metric([result, reason], n)
        yield contrib
        yield GaugeMetricFamily("sagmq_round", "The open round's number; -1 when no round is open.", value=r.round)
        phase = GaugeMetricFamily("sagmq_phase", "1 for the running job's phase, 0 for the others.", labels=["phase"])
        for p in PHASES:
            phase.add_metric([p], 1.0 if p == r.phase else 0.0)
        yield phase
        job = GaugeMetricFamily("sagmq_job_info", "The job the server runs or ran last; always 1.", labels=["job_id"])
        if r.job_id:
            job.add_metric([r.job_id], 1)
        yield job
        started = r.started_at
        yield GaugeMetricFamily("sagmq_round_open_seconds", "Seconds the open round has been open; 0 when none is.",
                                value=0.0 if started is None else max(0.0, time.time() - started))
        yield GaugeMetricFamily("sagmq_round_timeout_seconds", "The running job's train_timeout (0: none).",
                                value=r.timeout_s)
        yield from self._site_families()

    def _site_families(self) -> Iterator[Metric]:
        seen = _read(self._seen_at) if self._seen_at is not None else {}
        now_mono, now_wall = time.monotonic(), time.time()
        alive = sum(1 for t in seen.values() if now_mono - t <= self._client_timeout_s)
        yield GaugeMetricFamily("sagmq_sites_alive", "Sites heard from within SAGMQ_CLIENT_TIMEOUT_S.", value=alive)
        last = GaugeMetricFamily("sagmq_site_last_seen_timestamp_seconds", "When each site was last heard from "
                                 "(Unix time).", labels=["site"])
        for site, t in sorted(seen.items()):
            last.add_metric([site], now_wall - (now_mono - t))
        yield last


def _read(fn: SeenAt) -> dict[str, float]:
    """Call a reader of another thread's dict; a dict resized while it is read raises RuntimeError: try again."""
    for _ in range(3):
        try:
            return dict(fn())
        except RuntimeError:
            continue
    return {}


class _MeterCollector(Collector):
    """A Meter's families, built when scraped."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter

    def collect(self) -> Iterator[Metric]:
        """Every family of the meter, as of now."""
        return self.meter.families()


def meter_of(bus: object, service: str = "", site: str = "") -> Meter:
    """The bus's meter, or, for a bus without one (the in-memory bus), a new meter for its service."""
    meter = getattr(bus, "meter", None)
    if isinstance(meter, Meter):
        return meter
    return Meter(service or str(getattr(bus, "service", "")), site)


@dataclass(slots=True)
class Endpoint:
    """An HTTP server of a meter's metrics on a daemon thread."""

    port: int
    _stop: Callable[[], None]

    def close(self) -> None:
        """Stop serving (the port is free again)."""
        self._stop()


def serve_metrics(meter: Meter, port: int, addr: str = "0.0.0.0") -> Endpoint | None:
    """Serve the meter's registry over HTTP on port (any path; `/metrics` by convention); None if port is 0."""
    if port == 0:
        return None
    try:
        httpd, _thread = start_wsgi_server(port, addr, registry=meter.registry())
    except OSError as e:
        raise ConfigError(f"SAGMQ_METRICS_PORT={port}: cannot serve metrics on {addr}:{port}: {e.strerror or e}") from e

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()

    log.info("metrics on http://%s:%d/metrics", addr, httpd.server_port)
    return Endpoint(httpd.server_port, stop)
