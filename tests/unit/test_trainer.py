"""NPTrainer: NVFlare's arithmetic, its errors, and its local model save (off the result's path)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from sagmq.client.api import RC_BAD_TASK_DATA, RC_TASK_UNKNOWN, TaskContext, TaskError
from sagmq.client.np_trainer import BACKGROUND_SAVE_BYTES, NPTrainer
from sagmq.storage.files import NpySaver
from sagmq.wire.codec import DXO, WEIGHT_DIFF, WEIGHTS


def ctx(tmp_path: Path) -> TaskContext:
    return TaskContext("site-1", "job", 0, 2, "train", tmp_path)


@pytest.mark.parametrize("n", [9, 600_000], ids=["small: saved at once", "large: saved in the background"])
def test_train_adds_delta_and_saves_the_local_model(tmp_path: Path, n: int) -> None:
    t = NPTrainer(delta=2)
    t.saver = NpySaver()
    w = np.arange(n, dtype=np.float32).reshape(3, -1)
    out = t.execute("train", DXO(WEIGHTS, {"numpy_key": w}), ctx(tmp_path))
    if w.nbytes < BACKGROUND_SAVE_BYTES:  # written before execute returned, not by the writer thread
        np.testing.assert_array_equal(np.load(tmp_path / "model" / "best_numpy.npy"), w + 2)
    t.saver.flush()
    assert t.saver.finished == (w.nbytes >= BACKGROUND_SAVE_BYTES) * 1
    np.testing.assert_array_equal(out.data["numpy_key"], w + 2)
    assert out.data["numpy_key"].dtype == np.float32
    t.wait_saved()
    np.testing.assert_array_equal(np.load(tmp_path / "model" / "best_numpy.npy"), w + 2)
    out2 = t.execute("train", DXO(WEIGHTS, {"numpy_key": w + 10}), ctx(tmp_path))  # saves in order
    t.wait_saved()
    np.testing.assert_array_equal(np.load(tmp_path / "model" / "best_numpy.npy"), out2.data["numpy_key"])


def test_a_failed_local_save_is_logged_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "model").write_text("a file where the folder should be")
    t = NPTrainer()
    with caplog.at_level(logging.WARNING, logger="sagmq.executor"):
        out = t.execute("train", DXO(WEIGHTS, {"numpy_key": np.zeros(3, np.float32)}), ctx(tmp_path))
        t.wait_saved()
    np.testing.assert_array_equal(out.data["numpy_key"], np.ones(3, np.float32))
    assert "could not save the local model" in caplog.text


@pytest.mark.parametrize(("task", "dxo", "rc"), [
    ("validate", DXO(WEIGHTS, {"numpy_key": np.zeros(3)}), RC_TASK_UNKNOWN),
    ("train", DXO(WEIGHT_DIFF, {"numpy_key": np.zeros(3)}), RC_BAD_TASK_DATA),
    ("train", DXO(WEIGHTS, {}), RC_BAD_TASK_DATA),
])
def test_bad_tasks_are_refused_with_a_return_code(tmp_path: Path, task: str, dxo: DXO, rc: str) -> None:
    with pytest.raises(TaskError) as e:
        NPTrainer().execute(task, dxo, ctx(tmp_path))
    assert e.value.rc == rc


def test_submit_model_waits_for_the_pending_local_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from .test_npy_saver import Gate

    gate = Gate(monkeypatch)
    t = NPTrainer(delta=1)
    t.saver = NpySaver()
    w = np.zeros(BACKGROUND_SAVE_BYTES // 4, np.float32)
    t.execute("train", DXO(WEIGHTS, {"numpy_key": w}), ctx(tmp_path))  # returns while the writer is held
    assert gate.entered.wait(10)
    got: list[DXO] = []
    reader = threading.Thread(target=lambda: got.append(t.execute("submit_model", DXO(WEIGHTS, {}), ctx(tmp_path))))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive()  # it does not read a file still being written
    gate.open.set()
    reader.join(10)
    np.testing.assert_array_equal(got[0].data["numpy_key"], w + 1)
