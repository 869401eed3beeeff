"""The persistor's store: history.json is merged by round and rewritten at most once a second."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import services.persistor.store as store_mod
from services.persistor.store import ModelStore

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
