"""What every choreography test uses: services built and run as serve() runs them, on a MemoryBus,
and a probe (the test's own bus) that publishes inputs and collects what the services publish."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from sagmq.memory import MemoryBroker, MemoryBus
from sagmq.runtime.lifecycle import Service
from sagmq.wire.bus import Bus, Delivery
from sagmq.wire.messages import Message
from sagmq.wire.settings import Settings
from sagmq.wire.topology import Binding, Names, Queue, Topology, service_topology

M = TypeVar("M", bound=Message)
T = TypeVar("T")
LIMIT = 2**27  # decoding limit for what the probe reads


def service_bus(broker: MemoryBroker, settings: Settings, name: str, service_topology_too: bool = True) -> MemoryBus:
    """A service's bus, connected and with the service topology declared, as serve() makes it."""
    bus = MemoryBus(broker, settings, name).connect()
    if service_topology_too:
        bus.declare(service_topology(settings.prefix))
    return bus


@contextmanager
def running(broker: MemoryBroker, build: Callable[[Bus], Service], bus: MemoryBus) -> Iterator[Service]:
    """Run a service's loop in a thread of its own; stop it, and close its bus, on the way out."""
    svc = build(bus)

    def loop() -> None:
        try:
            svc.run()
        finally:
            bus.close()

    t = threading.Thread(target=loop, name=bus.service, daemon=True)
    t.start()
    try:
        yield svc
    finally:
        svc.stop.set()
        broker.wake()
        t.join(10)
        assert not t.is_alive(), f"{bus.service} did not stop"


class Probe:
    """The test's side: publishes on its own bus and records what reaches its queue.

    Its queue is bound to the events exchange ('#'), the results exchange, the dead-letter exchange,
    and to whatever else the test names.
    """

    def __init__(self, broker: MemoryBroker, settings: Settings, also: tuple[tuple[str, str], ...] = (),
                 user: str | None = None) -> None:
        broker.declare(service_topology(settings.prefix))
        n = Names(settings.prefix)
        self.queue = f"probe.{uuid.uuid4().hex[:8]}"
        binds = ((n.events, "#"), (n.results, "result"), (n.dead, ""), *also)
        broker.declare(Topology((), (Queue(self.queue),), tuple(Binding(self.queue, ex, rk) for ex, rk in binds)))
        self.bus = MemoryBus(broker, settings, "probe", user).connect()
        self.names = self.bus.names
        self.got: list[Delivery] = []
        self.bus.consume(self.queue, self.got.append, prefetch=0)

    def wait(self, pred: Callable[[], T | None], what: str, timeout: float = 5.0) -> T:
        """Serve the probe's bus (waiting on the broker, not sleeping) until pred gives something."""
        deadline = time.monotonic() + timeout
        while True:
            value = pred()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            self.bus.process(min(left, 0.05))

    def all(self, cls: type[M], where: Callable[[M], bool] = lambda m: True) -> list[M]:
        """Every message of a type received so far (by the probe's own bus too) that passes where."""
        msgs = [d.message(cls, LIMIT) for d in self.got if d.msg_type == cls.TYPE]
        return [m for m in msgs if where(m)]

    def first(self, cls: type[M], where: Callable[[M], bool] = lambda m: True, timeout: float = 5.0) -> M:
        """The first message of a type that passes where, waiting for it."""
        return self.wait(lambda: next(iter(self.all(cls, where)), None), f"a {cls.TYPE} message", timeout)

    def dead(self, timeout: float = 5.0) -> Delivery:
        """The first dead-lettered message."""
        return self.wait(lambda: next((d for d in self.got if d.exchange == self.names.dead), None),
                         "a dead-lettered message", timeout)
