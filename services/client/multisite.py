"""Many sites in one process (`sagmq client --sites site-1..site-500`), for simulation.

Each site is a whole ClientService: its own queue, consumer, heartbeat, identity (the ``site``
of its messages) and executor instances. What the sites share is the connection (one bus, one
I/O thread) and a small pool of worker threads that runs their long tasks, one task at a time
per site and in order. The server, the aggregator and the persistor see N ordinary sites.

The broker validates one user for the whole connection, so the services accept the sites'
messages only where the deployment lets that user speak for them: a one-user deployment (the
services' own user, e.g. guest in local development) or SAGMQ_SIMULATION_USERS on the server
and the aggregator (see sagmq.wire.settings.Settings.may_speak_for and the README).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from sagmq.client.main import ClientService, flush_local_saves
from sagmq.wire.bus import Bus, Delivery
from sagmq.wire.codec import unpack
from sagmq.wire.errors import ConfigError
from sagmq.wire.settings import Settings, check_name, site_range

log = logging.getLogger(__name__)

SHARE_MIN_BYTES = 64 * 2**10  # bodies at least this large are shared between the sites (see MultiSite.share)
SHARED_BODIES = 4  # how many such bodies (and their decoded maps) are kept for sharing: a round's task and its
# forwarded aggregate
MAX_SITES = 100_000  # a typo such as site-1..site-1000000 fails at start instead of filling the broker


def parse_sites(spec: str, prefix: str = "site-") -> list[str]:
    """The site names of `--sites`: a count N (prefix1 .. prefixN), or a comma list of names and
    ranges (`site-1..site-500`); in order, each name once, each a valid site name."""
    spec = spec.strip()
    if spec.isdigit():
        n = int(spec)
        if n < 1:
            raise ConfigError("--sites N needs N >= 1")
        spec = f"{prefix}1..{prefix}{n}"
    names: list[str] = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        rng = site_range(item)
        if rng is None:
            names.append(check_name("site", item))
            continue
        pre, first, last = rng
        if last - first + 1 > MAX_SITES:
            raise ConfigError(f"site range {item!r} names more than {MAX_SITES} sites")
        names.extend(check_name("site", f"{pre}{i}") for i in range(first, last + 1))
        if len(names) > MAX_SITES:
            raise ConfigError(f"--sites names more than {MAX_SITES} sites")
    if not names:
        raise ConfigError(f"--sites {spec!r} names no site")
    dup = len(names) - len(set(names))
    if dup:
        raise ConfigError(f"--sites {spec!r} names {dup} site(s) twice")
    return names


class SerialPool:
    """A few threads that run many sites' work: in order and one at a time per key (site), keys
    taking turns, so one site's long queue does not starve the others."""

    def __init__(self, threads: int, room: Callable[[], bool] | None = None) -> None:
        self.room = room  # work waits while this says no (results still unconfirmed)
        self.threads = [threading.Thread(target=self._serve, name=f"sites-worker-{i}", daemon=True)
                        for i in range(max(1, threads))]
        self._ready: queue.Queue[str | None] = queue.Queue()
        self._pending: dict[str, deque[Callable[[], None]]] = {}  # a key is here while queued or running
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def start(self) -> None:
        """Start the threads."""
        for t in self.threads:
            t.start()

    def submit(self, key: str, fn: Callable[[], None]) -> None:
        """Run fn on a pool thread after what was submitted before under key."""
        with self._lock:
            q = self._pending.get(key)
            if q is not None:
                q.append(fn)
                return
            self._pending[key] = deque((fn,))
        self._ready.put(key)

    def close(self, timeout_s: float = 5.0) -> None:
        """Let the threads end once the work in hand is done (what is queued is dropped)."""
        self._closed.set()
        with self._lock:
            self._pending.clear()
        for _ in self.threads:
            self._ready.put(None)
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))

    def _serve(self) -> None:
        while True:
            key = self._ready.get()
            if key is None:
                return
            with self._lock:
                q = self._pending.get(key)
                fn = q.popleft() if q else None
            if fn is not None:
                while self.room is not None and not self.room() and not self._closed.wait(0.005):
                    pass
                try:
                    fn()
                except Exception:  # a site's own failures are results; this is a bug, logged, not fatal
                    log.exception("work of site %s failed", key)
                del fn
            with self._lock:
                q = self._pending.get(key)
                again = bool(q)
                if q is not None and not q:
                    del self._pending[key]
            if again:
                self._ready.put(key)  # behind the other sites' turns


def default_workers() -> int:
    """A small pool: the cores, at most four (numpy releases the GIL for the heavy part)."""
    return max(1, min(4, os.cpu_count() or 1))


class MultiSite:
    """Many ClientServices over one bus: one stop event, one worker pool, heartbeats spread out."""

    def __init__(self, settings: Settings, bus: Bus, sites: list[str], workers: int | None = None) -> None:
        self.s = settings
        self.bus = bus
        self.stop = threading.Event()
        threads = workers or default_workers()
        self.max_unconfirmed = max(2, threads)
        self.pool = SerialPool(threads, self._room)
        self.sites = [ClientService(settings.with_site(site), bus, self.pool, self.stop) for site in sites]
        # the last few large bodies by message id, each with its decoded map (I/O thread)
        self._bodies: OrderedDict[str, tuple[bytes, Any]] = OrderedDict()
        for svc in self.sites:
            svc.intake = self.share
        self._started = 0  # sites whose first tick (their hello) came: spread over the first heartbeat
        self._t0 = 0.0

    def share(self, d: Delivery) -> None:
        """One copy of a body that many of the process's sites got (a task fanned out to them, an aggregate
        forwarded to them), decoded once: a later delivery with the same message id and the same bytes takes
        the first one's body and decoded map (Delivery.payload), and its own copy is freed. Every site's
        message then holds read-only arrays over the same bytes (decoding copies each array out of the body,
        so 250 sites decoding for themselves held 250 models, waiting in the pool's queue or as forwarded
        aggregates). 1000 sites then hold one model, not 1000. (Parts of a model larger than the chunk size
        are assembled per site, as they are in one-site processes.) A body that does not decode raises
        DecodeError here, as the site's own decoding would."""
        if not d.message_id or d.payload is not None or len(d.body) < SHARE_MIN_BYTES:
            return
        kept = self._bodies.get(d.message_id)
        if kept is not None and (kept[0] is d.body or kept[0] == d.body):
            d.body, d.payload = kept
            self._bodies.move_to_end(d.message_id)
            return
        d.payload = unpack(d.body, self.s.max_body_bytes)
        self._bodies[d.message_id] = (d.body, d.payload)
        while len(self._bodies) > SHARED_BODIES:
            self._bodies.popitem(last=False)

    def _room(self) -> bool:
        """Whether a worker may start another task: few enough large results wait for their confirm.
        Without it, 250 sites that each train in milliseconds queue 250 results (a model each) at once."""
        return sum(svc.large_unconfirmed for svc in self.sites) < self.max_unconfirmed

    def start(self) -> None:
        """Declare every site's queue and consume them all; start the pool."""
        t = time.monotonic()
        self.pool.start()
        for svc in self.sites:
            svc.start()
        log.info("%d sites ready in %.1f s (%s .. %s; %d workers; custom code %s)", len(self.sites),
                 time.monotonic() - t, self.sites[0].site, self.sites[-1].site, len(self.pool.threads),
                 "allowed" if self.s.allow_custom_code else "refused")
        self._t0 = time.monotonic()

    def tick(self) -> None:
        """Each started site's tick (results, heartbeat). Sites start ticking one after another over
        the first heartbeat period, so N heartbeats do not reach the server all at once each period."""
        n = len(self.sites)
        due = n if self.s.heartbeat_s <= 0 else min(n, 1 + int(n * (time.monotonic() - self._t0) / self.s.heartbeat_s))
        self._started = max(self._started, due)
        for svc in self.sites[:self._started]:
            svc.tick()

    def run(self) -> None:
        """Serve every site until stopped (SIGTERM, or a shutdown control to any of them)."""
        self.start()
        try:
            self.bus.run(self.stop, self.tick, 0.1)
        finally:
            self.pool.close()
            for svc in self.sites:
                with svc.state.lock:
                    if svc.state.current:
                        svc.state.current.ctx.abort.set()
            flush_local_saves()


def serve_sites(settings: Settings, sites: list[str], workers: int | None = None) -> int:
    """main() of `sagmq client --sites`: one process, one connection, many sites."""
    from sagmq.runtime.lifecycle import serve

    if workers is not None and workers < 1:
        raise ConfigError("--workers must be at least 1")
    settings = replace(settings, site="")
    return serve("client", lambda s, bus: MultiSite(s, bus, sites, workers), settings=settings,
                 service_topology_too=False, keep_freed=True)
