"""Health files (sagmq.runtime.health): what `sagmq health` says about each state of a service."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sagmq.runtime.health import HealthWriter, check_health, health_path, judge, read_health, stale_after_s
from sagmq.wire.settings import Settings

NOW = 1_000_000.0


def data(**over: object) -> dict[str, object]:
    base: dict[str, object] = {"pid": os.getpid(), "service": "server", "site": "", "connected": True,
                               "since": NOW - 100, "loop_at": NOW - 1, "started_at": NOW - 100,
                               "written_at": NOW - 0.5}
    return {**base, **over}


def test_verdicts() -> None:
    ok = judge(data(), 10, NOW)
    assert ok.ok and ok.line.startswith("server: healthy")
    starting = judge(None, 10, NOW, name="server")
    assert not starting.ok and starting.line == "server: starting (no health file yet)"
    lost = judge(data(connected=False, since=NOW - 42), 10, NOW)
    assert not lost.ok and "broker connection lost since 42s" in lost.line
    stuck = judge(data(loop_at=NOW - 31), 10, NOW)
    assert not stuck.ok and "stuck since 31s" in stuck.line
    gone = judge(data(pid=999_999_999), 10, NOW, alive=lambda pid: False)
    assert not gone.ok and "process 999999999 is gone" in gone.line
    site = judge(data(service="client", site="site-3", loop_at=NOW - 9.9), 10, NOW)
    assert site.ok and site.line.startswith("client[site-3]: healthy")
    assert not judge({}, 10, NOW).ok  # garbage


def test_stale_limit_follows_the_heartbeat() -> None:
    assert stale_after_s(Settings()) == 10.0
    assert stale_after_s(Settings(heartbeat_s=4.0)) == 20.0


def test_paths(tmp_path: Path) -> None:
    s = Settings(workspace=tmp_path)
    assert health_path(s, "server") == tmp_path / "health" / "server.json"
    assert health_path(s, "client", "site-2") == tmp_path / "health" / "client-site-2.json"
    assert health_path(Settings(health_file="/tmp/h.json"), "client", "x") == Path("/tmp/h.json")


class FakeLoop:
    """Collects what the writer asks the service loop to run; run() plays one turn of the loop."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], None]] = []

    def __call__(self, fn: Callable[[], None]) -> None:
        self.calls.append(fn)

    def run(self) -> None:
        calls, self.calls = self.calls, []
        for fn in calls:
            fn()


def test_writer_stamps_from_the_loop_and_reports_the_connection(tmp_path: Path) -> None:
    path = tmp_path / "health" / "client-site-1.json"
    connected = threading.Event()
    connected.set()
    loop = FakeLoop()
    w = HealthWriter(path, "client", "site-1", connected.is_set, loop)
    w.write()
    first = read_health(path)
    assert first is not None and first["connected"] is True and first["site"] == "site-1"
    assert first["pid"] == os.getpid()
    w.write()
    assert len(loop.calls) == 1  # one stamp asked at a time
    before = w.loop_at
    time.sleep(0.01)
    loop.run()
    assert w.loop_at > before
    w.write()
    assert read_health(path)["loop_at"] == w.loop_at  # type: ignore[index]
    connected.clear()
    w.write()
    lost = read_health(path)
    assert lost is not None and lost["connected"] is False and lost["since"] >= lost["started_at"]
    w.close()
    assert not path.exists()  # a clean stop leaves no file that would read as stuck


def test_check_health_of_every_file(tmp_path: Path) -> None:
    s = Settings(workspace=tmp_path)
    code, lines = check_health(s)
    assert code == 1 and "starting" in lines[0]
    (tmp_path / "health").mkdir()
    now = time.time()
    for name, over in (("server", {}), ("client-site-1", {"service": "client", "site": "site-1"})):
        (tmp_path / "health" / f"{name}.json").write_text(json.dumps(data(loop_at=now, **over)))
    assert check_health(s, now=now)[0] == 0
    assert check_health(s, "server", now=now)[0] == 0
    assert check_health(s, "client", now=now) == (0, [judge(data(loop_at=now, service="client", site="site-1"),
                                                            10, now).line])
    code, lines = check_health(s, "aggregator", now=now)
    assert code == 1 and lines == ["aggregator: starting (no health file yet)"]
    code, lines = check_health(s, now=now + 60)
    assert code == 1 and all("stuck since 60s" in line for line in lines)
