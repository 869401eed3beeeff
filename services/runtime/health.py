"""A service's health file, and `sagmq health`, which reads it (a container healthcheck).

Each service writes a small JSON file (SAGMQ_HEALTH_FILE, by default
``<workspace>/health/<service>[-<site>].json``) once a second::

    {"pid": 12, "service": "client", "site": "site-1", "connected": true, "since": 1700000000.0,
     "loop_at": 1700000041.2, "started_at": 1700000000.0, "written_at": 1700000041.9}

``loop_at`` is the last time the service's own loop ran: the writer thread asks the loop to stamp it
(``Bus.call_threadsafe``, run at the loop's next turn), so a loop stuck in a handler stops stamping
while the file keeps being written. ``connected`` is the bus's state and ``since`` when it last
changed; a bus busy reconnecting does not turn its loop, so the file says so rather than "stuck".

`sagmq health` exits 0 when the file is fresh (``loop_at`` within max(10 s, 5 × SAGMQ_HEARTBEAT_S)),
its process alive and the bus connected; otherwise 1, with one line saying why.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sagmq.wire.settings import Settings

log = logging.getLogger(__name__)

WRITE_EVERY_S = 1.0
MIN_STALE_S = 10.0


def health_dir(settings: Settings) -> Path:
    """Where the services write their health files by default."""
    return settings.workspace / "health"


def health_path(settings: Settings, service: str, site: str = "") -> Path:
    """This process's health file: SAGMQ_HEALTH_FILE, or <workspace>/health/<service>[-<site>].json."""
    if settings.health_file:
        return Path(settings.health_file)
    return health_dir(settings) / (f"{service}-{site}.json" if site else f"{service}.json")


def stale_after_s(settings: Settings) -> float:
    """How old loop_at may be before the service counts as stuck."""
    return max(MIN_STALE_S, 5 * settings.heartbeat_s)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace path with data at once (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class HealthWriter:
    """Writes the health file from a thread of its own; the service loop stamps loop_at."""

    def __init__(self, path: Path, service: str, site: str, connected: Callable[[], bool],
                 on_loop: Callable[[Callable[[], None]], None], every_s: float = WRITE_EVERY_S) -> None:
        self.path = path
        self.service = service
        self.site = site
        self._connected = connected
        self._on_loop = on_loop  # runs a callable on the service loop's thread (bus.call_threadsafe)
        self.every_s = every_s
        self.started_at = time.time()
        self.loop_at = self.started_at
        self._asked = False  # a stamp is queued on the loop and has not run yet
        self._state: bool | None = None
        self._since = self.started_at
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health", daemon=True)

    def stamp(self) -> None:
        """Run on the service loop: it is turning."""
        self.loop_at = time.time()
        self._asked = False

    def start(self) -> HealthWriter:
        """Write the file now, then once every every_s seconds."""
        self.write()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.write()
            except Exception as e:  # a full disk must not kill the service; the check then says stale
                log.warning("health file %s not written: %s", self.path, e, extra={"rate_kind": "health file"})

    def _is_connected(self) -> bool:
        try:
            return bool(self._connected())
        except Exception:  # the bus is between connections
            return False

    def write(self) -> None:
        """Ask the loop for a stamp (unless one is pending) and write what is known."""
        if not self._asked:
            self._asked = True
            try:
                self._on_loop(self.stamp)
            except Exception:  # not connected yet: asked again next time
                self._asked = False
        connected = self._is_connected()
        now = time.time()
        if connected != self._state:
            self._state, self._since = connected, now
        write_json(self.path, {"pid": os.getpid(), "service": self.service, "site": self.site,
                               "connected": connected, "since": self._since, "loop_at": self.loop_at,
                               "started_at": self.started_at, "written_at": now})

    def close(self, remove: bool = True) -> None:
        """Stop writing; remove the file (a service that stopped cleanly is not 'stuck')."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2 * self.every_s)
        if remove:
            try:
                self.path.unlink()
            except OSError:
                pass


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one health file's check."""

    ok: bool
    line: str


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (in this pid namespace)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: it exists
        return True
    return True


def judge(data: dict[str, Any] | None, stale_s: float, now: float, alive: Callable[[int], bool] = pid_alive,
          name: str = "service") -> Verdict:
    """The verdict on a health file's content (None: there is no file yet)."""
    if data is None:
        return Verdict(False, f"{name}: starting (no health file yet)")
    who = str(data.get("service") or name) + (f"[{data['site']}]" if data.get("site") else "")
    try:
        pid, loop_at = int(data["pid"]), float(data["loop_at"])
        connected, since = bool(data["connected"]), float(data.get("since") or loop_at)
    except (KeyError, TypeError, ValueError):
        return Verdict(False, f"{who}: unreadable health file")
    if not alive(pid):
        return Verdict(False, f"{who}: not running (process {pid} is gone)")
    if not connected:
        return Verdict(False, f"{who}: broker connection lost since {max(0.0, now - since):.0f}s")
    age = now - loop_at
    if age > stale_s:
        return Verdict(False, f"{who}: stuck since {age:.0f}s (its loop has not turned; limit {stale_s:g} s)")
    return Verdict(True, f"{who}: healthy (pid {pid}, connected, loop {max(0.0, age):.1f} s ago)")


def read_health(path: Path) -> dict[str, Any] | None:
    """A health file's content; None if there is none. Garbage reads as {} (judged unreadable)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def files_to_check(settings: Settings, service: str) -> list[Path]:
    """SAGMQ_HEALTH_FILE; else SERVICE's file(s) (client: the site's, or every client-*.json); else all."""
    if settings.health_file:
        return [Path(settings.health_file)]
    d = health_dir(settings)
    if service == "client" and settings.site and "{" not in settings.site:
        return [health_path(settings, "client", settings.site)]
    if service:
        found = sorted(d.glob(f"{service}-*.json")) if service == "client" else []
        return found or [health_path(settings, service)]
    return sorted(d.glob("*.json"))


def check_health(settings: Settings, service: str = "", now: float | None = None) -> tuple[int, list[str]]:
    """`sagmq health [SERVICE]`: exit code (0 healthy, 1 not) and one line per file checked."""
    files = files_to_check(settings, service)
    if not files:
        return 1, [f"starting: no health file under {health_dir(settings)} yet"]
    t = time.time() if now is None else now
    verdicts = [judge(read_health(f), stale_after_s(settings), t, name=service or f.stem) for f in files]
    return (0 if all(v.ok for v in verdicts) else 1), [v.line for v in verdicts]
