"""`sagmq supervise SERVICE [ARGS]`: run `sagmq SERVICE` as a child, restarting it when it crashes.

Restart semantics that fit a container's ``restart:`` policy (run it as the container's command):

- the child exits 0 (SIGTERM, ``sagmq shutdown all``): supervise exits 0, no restart;
- it exits 2 (usage), 3 (broker unreachable after retries, or credentials refused) or 4 (config): a
  restart cannot help, so supervise exits with that code at once;
- it dies of a signal or exits with any other code: it is started again after a backoff of 1 s,
  doubling to 30 s, back to 1 s once a child has stayed up 60 s; each restart is one log line.

SIGTERM and SIGINT are forwarded to the child; supervise then exits with the child's code.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sagmq.wire.errors import EXIT_BROKER, EXIT_CONFIG, EXIT_USAGE

log = logging.getLogger(__name__)

FINAL_CODES = (EXIT_USAGE, EXIT_BROKER, EXIT_CONFIG)  # exit with these: a restart would fail the same way
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
RESET_AFTER_S = 60.0
SERVICES = ("server", "aggregator", "persistor", "client")


@dataclass(slots=True)
class Backoff:
    """The wait before the next restart: doubling from first_s to max_s, reset after a long enough run."""

    first_s: float = FIRST_BACKOFF_S
    max_s: float = MAX_BACKOFF_S
    reset_after_s: float = RESET_AFTER_S
    next_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.next_s = self.first_s

    def after(self, ran_s: float) -> float:
        """The wait after a child that ran ran_s seconds died."""
        if ran_s >= self.reset_after_s:
            self.next_s = self.first_s
        wait, self.next_s = self.next_s, min(self.max_s, self.next_s * 2)
        return wait


def describe(code: int) -> str:
    """A child's return code in words."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def child_command(service: str, args: Sequence[str]) -> list[str]:
    """`sagmq SERVICE ARGS` with this interpreter."""
    return [sys.executable, "-m", "sagmq.cli.main", service, *args]


class Supervisor:
    """Runs one child command, restarting it as the module docstring says."""

    def __init__(self, command: list[str], name: str, backoff: Backoff | None = None,
                 spawn: Callable[[list[str]], subprocess.Popen[bytes]] | None = None) -> None:
        self.command = command
        self.name = name
        self.backoff = backoff or Backoff()
        self._spawn = spawn or (lambda cmd: subprocess.Popen(cmd))
        self.stopping = threading.Event()
        self.child: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def signal(self, signum: int) -> None:
        """SIGTERM/SIGINT: pass it on to the child, and do not restart it."""
        self.stopping.set()
        child = self.child
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    def install(self) -> None:
        """Forward SIGTERM and SIGINT."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: self.signal(signum))

    def run(self) -> int:
        """Run the child until it exits for good; return the exit code supervise should exit with."""
        while True:
            started = time.monotonic()
            self.child = self._spawn(self.command)
            if self.stopping.is_set():  # a signal that came while it was being started
                self.child.send_signal(signal.SIGTERM)
            code = self.child.wait()
            ran = time.monotonic() - started
            if self.stopping.is_set():
                log.info("%s %s after the stop signal; supervise exits", self.name, describe(code))
                return max(code, 0) if code >= 0 else 0
            if code == 0:
                log.info("%s exited with code 0; not restarting it", self.name)
                return 0
            if code in FINAL_CODES:
                log.error("%s exited with code %d (%s); not restarting it", self.name, code,
                          {EXIT_USAGE: "usage", EXIT_BROKER: "broker unreachable or credentials refused",
                           EXIT_CONFIG: "invalid settings"}[code])
                return code
            wait = self.backoff.after(ran)
            self.restarts += 1
            log.warning("%s %s after %.1f s; restarting it in %g s (restart %d)", self.name, describe(code), ran,
                        wait, self.restarts)
            if self.stopping.wait(wait):
                log.info("stop signal while waiting to restart %s; supervise exits", self.name)
                return 0


def run_supervise(argv: list[str]) -> int:
    """Entry point of `sagmq supervise SERVICE [ARGS]`."""
    from sagmq.runtime.logs import setup_logging

    if not argv or argv[0] not in SERVICES or argv[0] in ("-h", "--help"):
        print(f"usage: sagmq supervise {{{','.join(SERVICES)}}} [ARGS...]\n"
              "Run `sagmq SERVICE ARGS` and restart it when it crashes (see sagmq.runtime.supervise).",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else EXIT_USAGE
    service, args = argv[0], argv[1:]
    setup_logging("INFO", f"supervise[{service}]")
    sup = Supervisor(child_command(service, args), service)
    sup.install()
    return sup.run()
