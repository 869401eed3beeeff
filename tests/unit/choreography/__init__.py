"""Broker-free tests of each service's choreography: messages in, messages out, on a MemoryBroker."""
