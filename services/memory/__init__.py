"""An in-memory bus with the wire bus's interface, for broker-free tests of each service."""

from sagmq.memory.broker import MemoryBroker
from sagmq.memory.bus import MemoryBus

__all__ = ["MemoryBroker", "MemoryBus"]
