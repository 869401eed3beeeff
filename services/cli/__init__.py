"""The `sagmq` command: service launchers, admin commands over the broker, and poc."""
