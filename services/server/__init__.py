"""The server service: job queue, round state machine, site registry, admin commands."""
