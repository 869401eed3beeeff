"""The aggregator service: accumulates each round's results as they arrive."""
