"""The persistor's store: history.json is merged by round and rewritten at most once a second."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import sagmq.persistor.store as store_mod
from sagmq.persistor.store import ModelStore

JOB = "b" * 32


def history(tmp_path: Path) -> list[dict]:
    return json.loads((tmp_path / "persistor" / "jobs" / JOB / "history.json").read_text())


def test_history_is_written_at_once_then_at_most_every_second(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(store_mod.time, "monotonic", lambda: now[0])
    st = ModelStore(tmp_path)
    st.merge_history(JOB, [{"round": 0, "accepted": ["a"]}])
    assert history(tmp_path) == [{"round": 0, "accepted": ["a"]}]  # the first one at once
    st.merge_history(JOB, [{"round": 2, "accepted": []}, {"round": 1, "accepted": ["b"]}])
    assert [h["round"] for h in history(tmp_path)] == [0]  # within the second: kept in memory
    st.flush_history()  # the persistor's tick
    assert [h["round"] for h in history(tmp_path)] == [0, 1, 2]
    st.merge_history(JOB, [{"round": 1, "accepted": ["c"]}])  # a record replaces its round's
    now[0] += store_mod.HISTORY_EVERY_S
    st.merge_history(JOB, [{"round": 3, "accepted": []}])  # a second later: written at once
    assert [(h["round"], h["accepted"]) for h in history(tmp_path)] == [(0, ["a"]), (1, ["c"]), (2, []), (3, [])]


def test_a_download_and_the_jobs_end_see_every_record(tmp_path: Path) -> None:
    st = ModelStore(tmp_path)
    st.save(JOB, 0, {"numpy_key": np.zeros(3, np.float32)}, "models", "server.npy")
    st.merge_history(JOB, [{"round": 0}])
    st.merge_history(JOB, [{"round": 1}])
    assert json.loads(st.files(JOB)["history.json"]) == [{"round": 0}, {"round": 1}]
    st.merge_history(JOB, [{"round": 2}])
    st.replace_history(JOB, [{"round": 0, "final": True}])  # the job's end sends it whole
    assert history(tmp_path) == [{"round": 0, "final": True}]


def test_history_resumes_from_the_file_after_a_restart(tmp_path: Path) -> None:
    ModelStore(tmp_path).replace_history(JOB, [{"round": 0}, {"round": 1}])
    st = ModelStore(tmp_path)  # a new persistor process
    st.merge_history(JOB, [{"round": 2}])
    st.flush_history()
    assert [h["round"] for h in history(tmp_path)] == [0, 1, 2]


def test_last_round_follows_saves(tmp_path: Path) -> None:
    st = ModelStore(tmp_path)
    assert st.last_round(JOB) is None
    st.save(JOB, 4, {"numpy_key": np.zeros(3, np.float32)}, "models", "server.npy")
    assert st.last_round(JOB) == 4 and ModelStore(tmp_path).last_round(JOB) == 4  # cached, and on disk


def test_the_last_save_is_the_snapshot_the_model_still_is(tmp_path: Path) -> None:
    st = ModelStore(tmp_path)
    for r in (0, 1, 2):
        st.save(JOB, r, {"numpy_key": np.full(3, r, np.float32)}, "out", "m.npy")
    assert ModelStore(tmp_path).last_saved(JOB) == (2, "out", "m.npy")
    st.save(JOB, 1, {"numpy_key": np.full(3, 7, np.float32)}, "out", "m.npy")  # a resumed job ran round 1 again
    again = ModelStore(tmp_path)
    assert again.last_saved(JOB) == (1, "out", "m.npy")  # not the highest snapshot: round-2 is history now
    assert not (tmp_path / "persistor" / "jobs" / JOB / "progress.json").exists()


def test_a_crash_between_snapshot_and_rename_leaves_the_previous_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = ModelStore(tmp_path)
    st.save(JOB, 3, {"numpy_key": np.full(3, 3, np.float32)}, "models", "server.npy")

    def crash(src: str, dst: str) -> None:
        raise KeyboardInterrupt  # killed after the snapshot was linked, before the model was renamed

    monkeypatch.setattr(store_mod.os, "replace", crash)
    monkeypatch.setattr("sagmq.storage.files.os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        st.save(JOB, 4, {"numpy_key": np.full(3, 4, np.float32)}, "models", "server.npy")
    monkeypatch.undo()
    models = tmp_path / "persistor" / "jobs" / JOB / "models"
    (models / ".left-by-a-crash.tmp").hardlink_to(models / "round-4.npy")  # as if the temp file had survived
    st2 = ModelStore(tmp_path)
    assert st2.last_saved(JOB) == (3, "models", "server.npy")
    weights, source, last = st2.load(JOB, "models", "server.npy", None)
    assert (source, last) == ("saved", 3) and weights["numpy_key"].tolist() == [3, 3, 3]
