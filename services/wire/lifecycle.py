"""Process lifecycle shared by the services: graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import os
import signal
import threading


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
