"""An in-memory bus with the wire bus's interface, for broker-free tests of each service."""
