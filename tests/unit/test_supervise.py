"""`sagmq supervise` (sagmq.runtime.supervise): restart rules, with real child processes."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from sagmq.runtime.supervise import Backoff, Supervisor, describe


def test_backoff_doubles_to_30_s_and_resets_after_60_s_up() -> None:
    b = Backoff()
    assert [b.after(0.5) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert b.after(61) == 1  # the child had been up a minute: start over
    assert b.after(1) == 2


def test_describe() -> None:
    assert describe(-9) == "was killed by SIGKILL"
    assert describe(1) == "exited with code 1"


def script(tmp_path: Path, body: str) -> list[str]:
    """A child that counts its runs in tmp_path/runs, then runs body (it sees `runs`)."""
    f = tmp_path / "child.py"
    f.write_text("import os, sys, time, signal\n"
                 f"p = {str(tmp_path / 'runs')!r}\n"
                 "runs = len(open(p).read()) + 1 if os.path.exists(p) else 1\n"
                 "open(p, 'a').write('x')\n" + body)
    return [sys.executable, str(f)]


def fast() -> Backoff:
    return Backoff(first_s=0.05, max_s=0.2)


def test_crashes_are_restarted_until_a_clean_exit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cmd = script(tmp_path, "if runs == 1: os.kill(os.getpid(), signal.SIGKILL)\n"
                           "sys.exit(1 if runs == 2 else 0)\n")
    sup = Supervisor(cmd, "child", fast())
    with caplog.at_level("INFO"):
        assert sup.run() == 0
    assert sup.restarts == 2 and (tmp_path / "runs").read_text() == "xxx"
    lines = [r.getMessage() for r in caplog.records if "restarting it in" in r.getMessage()]
    assert len(lines) == 2 and "killed by SIGKILL" in lines[0] and "exited with code 1" in lines[1]


@pytest.mark.parametrize("code", [2, 3, 4])
def test_usage_broker_and_config_exits_are_final(tmp_path: Path, code: int) -> None:
    sup = Supervisor(script(tmp_path, f"sys.exit({code})\n"), "child", fast())
    assert sup.run() == code
    assert sup.restarts == 0


def test_sigterm_is_forwarded_and_ends_supervision(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    cmd = script(tmp_path, "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
                           f"open({str(ready)!r}, 'w').close()\ntime.sleep(60)\n")
    sup = Supervisor(cmd, "child", fast())
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(sup.run()))
    t.start()
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline, "the child did not start"
        time.sleep(0.02)
    sup.signal(signal.SIGTERM)
    t.join(30)
    assert result == [0] and sup.restarts == 0

