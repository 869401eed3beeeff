"""Process lifecycle shared by the services: settings, logging, connection, graceful stop."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Protocol

from sagmq.amqp import AmqpBus
from sagmq.amqp.connection import AUTH_ERRORS
from sagmq.runtime.health import HealthWriter, health_path
from sagmq.runtime.logs import setup_logging
from sagmq.runtime.metrics import Meter, serve_metrics
from sagmq.wire.bus import Bus
from sagmq.wire.errors import BrokerUnavailable
from sagmq.wire.settings import Settings, load_settings
from sagmq.wire.topology import service_topology

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 2**31 - 1  # the largest value mallopt takes (a C int)


def keep_freed_memory() -> bool:
    """Ask glibc to keep large freed blocks for reuse instead of unmapping them.

    Each round allocates model-sized buffers (an assembled task, a result, the sums) and frees
    them. By default glibc maps each such block fresh and unmaps it on free, so every round
    page-faults the whole model in again: about 80 ms of CPU per 200 MB per process on this
    project's machine, against about 25 ms with the blocks kept. The cost is that a process's
    resident memory stays at its peak between rounds, and can creep up where blocks of other
    sizes split the kept ones, so only the services whose buffers recur every round (the sites,
    the aggregator) use it. Skipped where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES) == 1)
    if not ok:
        logging.getLogger(__name__).info("mallopt refused: freed model buffers go back to the system")
    return ok


def install_stop_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set stop, so the service loop ends after its current message."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    exit_with_parent(stop)


def exit_with_parent(stop: threading.Event, env: dict[str, str] | None = None) -> None:
    """With SAGMQ_EXIT_WITH_PARENT=1 (set by `sagmq poc` and `sagmq bench`), stop once the process
    that started this one is gone, so a killed poc leaves no services behind."""
    env = dict(os.environ) if env is None else env
    if env.get("SAGMQ_EXIT_WITH_PARENT") != "1":
        return
    parent = os.getppid()

    def watch() -> None:
        while not stop.wait(1.0):
            if os.getppid() != parent:
                stop.set()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class Service(Protocol):
    """What serve() runs: a stop event and a loop that returns once it is set."""

    stop: threading.Event

    def run(self) -> None:
        """Serve until stop is set."""


def refused_line(e: BrokerUnavailable, settings: Settings) -> str | None:
    """The one log line for credentials the broker refused (None for other failures)."""
    if isinstance(e.__cause__, AUTH_ERRORS):
        return f"the broker refused user {settings.amqp_user}: check SAGMQ_AMQP_URL ({e.reason})"
    return None


def serve(name: str, build: Callable[[Settings, Bus], Service], argv: list[str] | None = None,
          settings: Settings | None = None, service_topology_too: bool = True, keep_freed: bool = False,
          on_start: Callable[[Service], None] | None = None) -> int:
    """main() of a service: settings, then logging, then the connection, then the service (on_start(svc)
    just before it runs). Refused credentials (at start or on a reconnect) raise BrokerUnavailable
    (exit 3) after one clear log line."""
    if settings is None:
        argparse.ArgumentParser(prog=f"sagmq {name}", description=f"Run the sagmq {name} service.").parse_args(argv)
        settings = load_settings()
    site = settings.site if name == "client" else ""
    setup_logging(settings.log_level, f"{name}[{site}]" if site else name)
    if keep_freed:  # (the sites and the aggregator, which move several models' worth of bytes a round)
        keep_freed_memory()
    meter = Meter(name, site)
    # served before connecting: a taken port fails at once, not after a wait for the broker
    metrics = serve_metrics(meter, settings.metrics_port)  # (SAGMQ_METRICS_PORT; 0: none)
    try:
        bus = AmqpBus(settings, f"{name}-{site}" if site else name, meter=meter).connect()
    except BrokerUnavailable as e:
        logging.getLogger(__name__).error("%s", refused_line(e, settings) or e)
        if metrics is not None:
            metrics.close()
        raise
    health: HealthWriter | None = None
    try:
        if service_topology_too:
            bus.declare(service_topology(settings.prefix, settings))
        svc = build(settings, bus)
        install_stop_signals(svc.stop)
        if on_start is not None:
            on_start(svc)
        health = HealthWriter(health_path(settings, name, site), name, site, lambda: not bus.broken(),
                              bus.call_threadsafe).start()
        svc.run()
    except BrokerUnavailable as e:  # a reconnect that failed for good
        logging.getLogger(__name__).error("%s", refused_line(e, settings) or e)
        raise
    finally:
        if health is not None:
            health.close()
        if metrics is not None:
            metrics.close()
        bus.close()
    return 0
