"""NpySaver: local saves off the caller's path, one pending save per file (the newest), bounded in bytes."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from sagmq.storage import files
from sagmq.storage.files import NpySaver

from .test_files import np_save_bytes


class Gate:
    """Holds the writer inside overwrite_npy until opened; records what it wrote, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()
        self.order: list[tuple[Path, float]] = []
        real = files.overwrite_npy

        def slow(path: Path, arr: np.ndarray) -> None:
            self.entered.set()
            assert self.open.wait(10), "the test never opened the gate"
            self.order.append((path, float(arr.flat[0])))
            real(path, arr)

        monkeypatch.setattr(files, "overwrite_npy", slow)


def test_a_newer_save_of_a_waiting_file_replaces_it_and_only_the_newest_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(monkeypatch)
    saver = NpySaver()
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    saver.save(a, np.full(4, 1.0), pytest.fail)
    assert gate.entered.wait(10)  # the writer holds a = 1.0; what comes next waits
    for v in (2.0, 3.0, 4.0):
        saver.save(a, np.full(4, v), pytest.fail)
    saver.save(b, np.full(4, 9.0), pytest.fail)
    assert saver.replaced == 2 and saver.pending_bytes == 2 * 32
    gate.open.set()
    assert saver.flush(timeout_s=10)
    assert gate.order == [(a, 1.0), (a, 4.0), (b, 9.0)]
    assert a.read_bytes() == np_save_bytes(np.full(4, 4.0))  # np.save's bytes
    assert b.read_bytes() == np_save_bytes(np.full(4, 9.0))


def test_saves_past_the_byte_budget_wait_for_the_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(monkeypatch)
    saver = NpySaver(budget_bytes=100)
    saver.save(tmp_path / "0.npy", np.zeros(10), pytest.fail)  # 80 bytes, taken by the writer
    assert gate.entered.wait(10)
    saver.save(tmp_path / "1.npy", np.zeros(10), pytest.fail)  # 80 bytes waiting: within the budget
    blocked = threading.Thread(target=saver.save, args=(tmp_path / "2.npy", np.zeros(10), pytest.fail))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive() and saver.pending_bytes == 80  # 160 bytes would pass the budget: it waits
    gate.open.set()
    blocked.join(10)
    assert not blocked.is_alive()
    assert saver.flush(timeout_s=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.npy", "1.npy", "2.npy"]
    assert saver.pending_bytes == 0


def test_one_array_larger_than_the_budget_is_still_saved(tmp_path: Path) -> None:
    saver = NpySaver(budget_bytes=8)
    saver.save(tmp_path / "big.npy", np.arange(100.0), pytest.fail)
    assert saver.flush(tmp_path / "big.npy", timeout_s=10)
    np.testing.assert_array_equal(np.load(tmp_path / "big.npy"), np.arange(100.0))


def test_save_now_drops_the_waiting_save_and_lands_after_the_one_being_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(monkeypatch)
    saver = NpySaver()
    a = tmp_path / "a.npy"
    saver.save(a, np.full(2, 1.0), pytest.fail)
    assert gate.entered.wait(10)
    saver.save(a, np.full(2, 2.0), pytest.fail)  # waiting: save_now makes it moot
    now = threading.Thread(target=saver.save_now, args=(a, np.full(2, 3.0)))
    now.start()
    now.join(0.2)
    assert now.is_alive()  # waits for the write of 1.0 in progress
    gate.open.set()
    now.join(10)
    assert saver.flush(timeout_s=10)
    assert gate.order == [(a, 1.0), (a, 3.0)] and saver.replaced == 1
    np.testing.assert_array_equal(np.load(a), np.full(2, 3.0))


def test_a_failed_write_is_reported_and_later_saves_go_on(tmp_path: Path) -> None:
    (tmp_path / "model").write_text("a file where the folder should be")
    errors: list[OSError] = []
    saver = NpySaver()
    saver.save(tmp_path / "model" / "x.npy", np.ones(3), errors.append)
    saver.save(tmp_path / "ok.npy", np.ones(3), pytest.fail)
    assert saver.flush(timeout_s=10)
    assert len(errors) == 1 and isinstance(errors[0], OSError)
    np.testing.assert_array_equal(np.load(tmp_path / "ok.npy"), np.ones(3))
