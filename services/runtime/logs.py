"""Logging set up once per process, in main(); pika's own logging kept quiet."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str, service: str) -> None:
    """Log lines to stderr as `time level service logger: message`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s.%(msecs)03d %(levelname)s {service} %(name)s: %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pika logs every failed connection attempt at ERROR with a traceback; the bus logs each loss
    # and retry itself, with the reason, once
    logging.getLogger("pika").setLevel(logging.CRITICAL)
