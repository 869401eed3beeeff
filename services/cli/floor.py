"""The broker's own floor for one scatter-and-gather round, with no FL logic (for `sagmq bench`).

One publisher sends B bytes once (in parts of the chunk size, CC-fanned out to N site
queues); N site processes each receive all parts and send B bytes back to one results
queue; the publisher gathers N × parts replies. Persistent messages, publisher
confirms, manual acks: the guarantees sagmq keeps, and nothing else.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import statistics
import threading
import time
from dataclasses import replace
from typing import Any

from sagmq.amqp import AmqpBus
from sagmq.wire.bus import Delivery
from sagmq.wire.settings import Settings
from sagmq.wire.topology import DIRECT, Binding, Exchange, Queue, Topology


def floor_topology(prefix: str, n: int) -> Topology:
    """An exchange, N site queues and a results queue, all under prefix.floor."""
    ex = f"{prefix}.floor.tasks"
    sites = [Queue(f"{prefix}.floor.site-{i}") for i in range(n)]
    return Topology((Exchange(ex, DIRECT),), (*sites, Queue(f"{prefix}.floor.results")),
                    tuple(Binding(q.name, ex, f"site-{i}") for i, q in enumerate(sites)))


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _site(settings: Settings, prefix: str, i: int, parts: int, part_bytes: int, rounds: int, ready: Any,
          cpu: Any) -> None:
    bus = AmqpBus(settings, f"floor-site-{i}", connect_timeout_s=30).connect()
    body = os.urandom(part_bytes)
    results = f"{prefix}.floor.results"
    seen = [0]
    stop = threading.Event()

    def on_part(d: Delivery) -> None:
        seen[0] += 1
        if seen[0] % parts == 0:
            for _ in range(parts):
                bus.publish_bytes("", results, body, "floor")
        if seen[0] == rounds * parts:
            stop.set()

    bus.consume(f"{prefix}.floor.site-{i}", on_part, prefetch=8)
    started = _cpu()
    ready.set()
    bus.run(stop)
    cpu.value = _cpu() - started  # the rounds' CPU, not the process's start
    bus.close()


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
    for i in range(clients):
        ev, u = ctx.Event(), ctx.Value("d", 0.0)
        p = ctx.Process(target=_site, args=(settings, prefix, i, parts, part_bytes, rounds, ev, u), daemon=True)
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
            bus.publish_bytes(f"{prefix}.floor.tasks", targets[0], body, "floor", {"CC": targets[1:]})
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
