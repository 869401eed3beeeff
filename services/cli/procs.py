"""Local sagmq processes (for `sagmq poc`, benchmarks and tests): start, watch, stop."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from sagmq.wire.settings import site_range

T = TypeVar("T")
SITES_PER_PROCESS = 250  # `sagmq poc` / `sagmq bench`: sites per process beyond ONE_PROCESS_EACH
ONE_PROCESS_EACH = 8  # up to this many sites, each has a process of its own (as a deployment does)


def site_groups(sites: Sequence[T], per_process: int = SITES_PER_PROCESS) -> list[list[T]]:
    """How `sagmq poc` and `sagmq bench` (and the bench's floor) spread sites over processes: up to
    ONE_PROCESS_EACH sites, one process each (as a deployment runs them); beyond, ceil(N / per_process)
    processes (at least two, so the sites' work uses both cores of a small machine), each running its
    share with `sagmq client --sites` over one connection."""
    n = len(sites)
    if n <= ONE_PROCESS_EACH:
        return [[s] for s in sites]
    procs = max(2, math.ceil(n / per_process))
    size = math.ceil(n / procs)
    return [list(sites[i:i + size]) for i in range(0, n, size)]


def group_spec(sites: list[str]) -> str:
    """A group of sites as a `--sites` argument (a range where the names allow it)."""
    if len(sites) > 1 and sites[0][-1:].isdigit():
        rng = site_range(f"{sites[0]}..{sites[-1]}")
        if rng is not None:
            pre, a, b = rng
            if [f"{pre}{i}" for i in range(a, b + 1)] == sites:
                return f"{sites[0]}..{sites[-1]}"
    return ",".join(sites)


@dataclass(slots=True)
class Proc:
    """One started process and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        """The last lines of its log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass(slots=True)
class LocalStack:
    """Processes started with one environment, logs under log_dir."""

    env: dict[str, str]
    log_dir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        """Run `sagmq ARGS` as a child process."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        full_env = {**os.environ, "SAGMQ_EXIT_WITH_PARENT": "1", **self.env, **(env or {})}
        with open(log, "ab") as f:
            p = subprocess.Popen([sys.executable, "-m", "sagmq.cli.main", *args], env=full_env,
                                 stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        proc = Proc(name, p, log)
        self.procs.append(proc)
        return proc

    def dead(self) -> list[Proc]:
        """Processes that exited."""
        return [p for p in self.procs if p.popen.poll() is not None]

    def stop(self, proc: Proc, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after timeout_s."""
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        return proc.popen.returncode

    def kill(self, proc: Proc) -> None:
        """SIGKILL at once (a crash)."""
        if proc.popen.poll() is None:
            proc.popen.kill()
            proc.popen.wait()

    def stop_all(self, timeout_s: float = 10.0) -> None:
        """Stop every process, clients first."""
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()
