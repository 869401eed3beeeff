"""Process lifecycle shared by the services: graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import threading


def install_stop_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set stop, so the service loop ends after its current message."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
