"""The broker's own floor for one scatter-and-gather round, with no FL logic (for `sagmq bench`).

One publisher sends B bytes once (in parts of the chunk size, CC-fanned out to N site
queues); N site repliers each receive all parts and send B bytes back to one results
queue; the publisher gathers N × parts replies. Persistent messages, publisher confirms
(the repliers do not wait for each one, as the sites do not), manual acks: the guarantees
sagmq keeps, and nothing else. The repliers run in as many processes as `sagmq bench` runs
the sites in (one each up to 8 sites, then a few with many sites on one connection each:
sagmq.cli.procs.site_groups), so the ratio stays fair at 1000 sites.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from sagmq.amqp import AmqpBus
from sagmq.cli.procs import site_groups
from sagmq.wire.bus import Delivery
from sagmq.wire.messages import Message
from sagmq.wire.settings import Settings
from sagmq.wire.topology import DIRECT, Binding, Exchange, Queue, Topology


def floor_topology(prefix: str, n: int) -> Topology:
    """An exchange, N site queues and a results queue, all under prefix.floor."""
    ex = f"{prefix}.floor.tasks"
    sites = [Queue(f"{prefix}.floor.site-{i}") for i in range(n)]
    return Topology((Exchange(ex, DIRECT),), (*sites, Queue(f"{prefix}.floor.results")),
                    tuple(Binding(q.name, ex, f"site-{i}") for i, q in enumerate(sites)))


@dataclass(frozen=True, slots=True)
class FloorReply(Message):
    """A floor site's reply: bytes and nothing else (a bench artefact, not part of the protocol)."""

    TYPE: ClassVar[str] = "floor"
    data: bytes


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _sites(settings: Settings, prefix: str, indices: list[int], parts: int, part_bytes: int, rounds: int,
           ready: Any, cpu: Any) -> None:
    """One floor process: the given site queues, consumed over one connection (as `sagmq client --sites`)."""
    bus = AmqpBus(settings, f"floor-sites-{indices[0]}", connect_timeout_s=30).connect()
    reply = FloorReply(os.urandom(part_bytes))
    results = f"{prefix}.floor.results"
    seen = dict.fromkeys(indices, 0)
    finished = [0]
    stop = threading.Event()

    def replier(i: int) -> Callable[[Delivery], None]:
        def on_part(d: Delivery) -> None:
            seen[i] += 1
            if seen[i] % parts == 0:
                for _ in range(parts):  # confirmed, without waiting for each confirm (as the sites send)
                    bus.send("", results, reply)
            if seen[i] == rounds * parts:
                finished[0] += 1
                if finished[0] == len(indices):
                    stop.set()
        return on_part

    for i in indices:
        bus.consume(f"{prefix}.floor.site-{i}", replier(i), prefetch=8)
    started = _cpu()
    ready.set()
    bus.run(stop)
    cpu.value = _cpu() - started  # the rounds' CPU, not the process's start
    bus.close()


def floor_groups(clients: int) -> list[list[int]]:
    """The floor's sites by process: as many processes as sagmq's sites use (see site_groups)."""
    return site_groups(list(range(clients)))


def measure_floor(settings: Settings, prefix: str, clients: int, nbytes: int, rounds: int,
                  cpu: dict[str, float] | None = None) -> list[float]:
    """Seconds per round of the bare broker round trip, for each of `rounds` rounds. If cpu is given,
    it gets the CPU seconds the publisher ("publisher") and the site processes ("clients") used
    during the rounds."""
    chunk = settings.chunk_bytes
    parts = max(1, math.ceil(nbytes / chunk))
    part_bytes = min(nbytes, chunk) or 1
    topo = floor_topology(prefix, clients)
    bus = AmqpBus(replace(settings, prefix=prefix), "floor", connect_timeout_s=30).connect()
    bus.declare(topo)
    ctx = mp.get_context("spawn")
    procs, events, used = [], [], []
    for group in floor_groups(clients):
        ev, u = ctx.Event(), ctx.Value("d", 0.0)
        p = ctx.Process(target=_sites, args=(settings, prefix, group, parts, part_bytes, rounds, ev, u),
                        daemon=True)
        p.start()
        procs.append(p)
        events.append(ev)
        used.append(u)
    for ev in events:
        if not ev.wait(120):
            raise RuntimeError("a floor site did not start")
    body = os.urandom(part_bytes)
    got = [0]
    bus.consume(f"{prefix}.floor.results", lambda d: got.__setitem__(0, got[0] + 1), prefetch=64)
    times = []
    targets = [f"site-{i}" for i in range(clients)]
    started = _cpu()
    for _ in range(rounds):
        got[0] = 0
        t0 = time.perf_counter()
        for _ in range(parts):
            bus.publish_bytes(f"{prefix}.floor.tasks", targets[0], body, "floor", {"BCC": targets[1:]})
        while got[0] < clients * parts:
            bus.process(0.01)
        times.append(time.perf_counter() - t0)
    publisher = _cpu() - started
    for p in procs:
        p.join(30)
    if cpu is not None:
        cpu["publisher"], cpu["clients"] = publisher, sum(u.value for u in used)
    bus.delete(topo)
    bus.close()
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")
