"""NPModelPersistor: where the model starts from, atomic saves with snapshots, and history.json
merged by round and rewritten at most once a second."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import sagmq.persistor.np_model_persistor as persistor_mod
from sagmq.persistor.np_model_persistor import DEFAULT_MODEL, NUMPY_KEY, NPModelPersistor
from sagmq.wire.errors import SagmqError

JOB = "b" * 32


def job_dir(tmp_path: Path) -> Path:
    return tmp_path / "persistor" / "jobs" / JOB


def make(tmp_path: Path, model_dir: str = "models", model_name: str = "server.npy") -> NPModelPersistor:
    return NPModelPersistor(job_dir(tmp_path), model_dir, model_name)


def history(tmp_path: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = json.loads((job_dir(tmp_path) / "history.json").read_text())
    return records


def test_history_is_written_at_once_then_at_most_every_second(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("sagmq.persistor.np_model_persistor.time.monotonic", lambda: now[0])
    st = make(tmp_path)
    st.merge_history([{"round": 0, "accepted": ["a"]}])
    assert history(tmp_path) == [{"round": 0, "accepted": ["a"]}]  # the first one at once
    st.merge_history([{"round": 2, "accepted": []}, {"round": 1, "accepted": ["b"]}])
    assert [h["round"] for h in history(tmp_path)] == [0]  # within the second: kept in memory
    st.flush_history()  # the persistor's tick
    assert [h["round"] for h in history(tmp_path)] == [0, 1, 2]
    st.merge_history([{"round": 1, "accepted": ["c"]}])  # a record replaces its round's
    now[0] += persistor_mod.HISTORY_EVERY_S
    st.merge_history([{"round": 3, "accepted": []}])  # a second later: written at once
    assert [(h["round"], h["accepted"]) for h in history(tmp_path)] == [(0, ["a"]), (1, ["c"]), (2, []), (3, [])]


def test_a_download_and_the_jobs_end_see_every_record(tmp_path: Path) -> None:
    st = make(tmp_path)
    st.save(0, {NUMPY_KEY: np.zeros(3, np.float32)})
    st.merge_history([{"round": 0}])
    st.merge_history([{"round": 1}])
    assert json.loads(st.files()["history.json"]) == [{"round": 0}, {"round": 1}]
    st.merge_history([{"round": 2}])
    st.merge_history([{"round": 0, "final": True}], at_once=True)  # the job's end: written at once
    assert history(tmp_path) == [{"round": 0, "final": True}, {"round": 1}, {"round": 2}]
    assert st.history() == history(tmp_path)


def test_history_resumes_from_the_file_after_a_restart(tmp_path: Path) -> None:
    make(tmp_path).merge_history([{"round": 0}, {"round": 1}], at_once=True)
    st = make(tmp_path)  # a new persistor process
    assert [h["round"] for h in st.history()] == [0, 1]  # what a resumed job's model.loaded carries
    st.merge_history([{"round": 2}])
    st.flush_history()
    assert [h["round"] for h in history(tmp_path)] == [0, 1, 2]


# --- merging by round (issue 11, failure 2: a restarted server's stale history) -----------------------

SAVED = {"round": 2, "task_id": "t2", "targets": ["a", "b"], "accepted": ["a", "b"], "rejected": [],
         "started_at": 10.0, "close_reason": "all 2 targets answered", "aggregated": ["a", "b"],
         "closed_at": 11.0, "seconds": 1.0}  # as a round's save sends it
ENDED = {**SAVED, "done_at": 11.1, "saved_at": 11.5}  # as the job's end sends it


def test_a_record_replaces_its_rounds_only_if_it_knows_at_least_as_much(tmp_path: Path) -> None:
    st = make(tmp_path)
    st.merge_history([ENDED])
    st.merge_history([SAVED], at_once=True)  # a restarted server's older copy of the same run
    assert history(tmp_path) == [ENDED]
    st.merge_history([{**ENDED, "accepted": ["a"]}], at_once=True)  # as complete: the newer one wins
    assert history(tmp_path)[0]["accepted"] == ["a"]


def test_the_servers_record_replaces_the_persistors_own_note_of_a_round(tmp_path: Path) -> None:
    st = make(tmp_path)
    note = {"round": 2, "task_id": "t2", "accepted": ["a", "b"], "aggregated": ["a", "b"], "saved_at": 11.5,
            "recorded_by": "persistor"}
    st.merge_history([note], at_once=True)
    st.merge_history([SAVED], at_once=True)
    assert history(tmp_path) == [SAVED]
    st.merge_history([note], at_once=True)  # and not the other way round
    assert history(tmp_path) == [SAVED]


def test_a_later_run_of_a_round_replaces_the_earlier_one(tmp_path: Path) -> None:
    st = make(tmp_path)
    st.merge_history([ENDED], at_once=True)  # the round ran, was not saved, and ran again after a restart
    rerun = {"round": 2, "task_id": "t2-again", "targets": ["a"], "accepted": ["a"], "started_at": 20.0}
    st.merge_history([rerun], at_once=True)
    assert history(tmp_path) == [rerun]
    st.merge_history([ENDED], at_once=True)  # the earlier run, sent again: stays replaced
    assert history(tmp_path) == [rerun]


def test_a_shorter_history_never_removes_rounds(tmp_path: Path) -> None:
    # the reproducer: 12 rounds, the server killed at rounds 3, 6 and 9; each restarted server's copy
    # (jobs.json) lags the persistor's, and the job's end sends what that server knows
    st = make(tmp_path)
    st.merge_history([{**ENDED, "round": r, "task_id": f"t{r}"} for r in range(12)], at_once=True)
    stale = [{**SAVED, "round": r, "task_id": f"t{r}"} for r in (0, 1, 3, 4, 6, 7, 9, 10, 11)]
    st.merge_history(stale, at_once=True)
    assert [h["round"] for h in history(tmp_path)] == list(range(12))
    assert all("saved_at" in h for h in history(tmp_path))  # none downgraded
    junk: list[Any] = ["not a record", {"round": 12}]
    st.merge_history(junk)
    assert [h["round"] for h in st.history()] == list(range(13))


def test_last_round_follows_saves(tmp_path: Path) -> None:
    st = make(tmp_path)
    assert st.last_round() is None
    st.save(4, {NUMPY_KEY: np.zeros(3, np.float32)})
    assert st.last_round() == 4 and make(tmp_path).last_round() == 4  # cached, and on disk


def test_the_last_save_is_the_snapshot_the_model_still_is(tmp_path: Path) -> None:
    st = make(tmp_path, "out", "m.npy")
    for r in (0, 1, 2):
        st.save(r, {NUMPY_KEY: np.full(3, r, np.float32)})
    assert make(tmp_path).last_saved() == (2, "out", "m.npy")
    st.save(1, {NUMPY_KEY: np.full(3, 7, np.float32)})  # a resumed job ran round 1 again
    again = make(tmp_path)
    assert again.last_saved() == (1, "out", "m.npy")  # not the highest snapshot: round-2 is history now
    assert not (job_dir(tmp_path) / "progress.json").exists()


def test_a_crash_between_snapshot_and_rename_leaves_the_previous_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = make(tmp_path)
    st.save(3, {NUMPY_KEY: np.full(3, 3, np.float32)})

    def crash(src: str, dst: str) -> None:
        raise KeyboardInterrupt  # killed after the snapshot was linked, before the model was renamed

    monkeypatch.setattr("sagmq.persistor.np_model_persistor.os.replace", crash)
    monkeypatch.setattr("sagmq.storage.files.os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        st.save(4, {NUMPY_KEY: np.full(3, 4, np.float32)})
    monkeypatch.undo()
    models = job_dir(tmp_path) / "models"
    (models / ".left-by-a-crash.tmp").hardlink_to(models / "round-4.npy")  # as if the temp file had survived
    st2 = make(tmp_path)
    assert st2.last_saved() == (3, "models", "server.npy")
    loaded = st2.load()
    assert (loaded.source, loaded.last_round) == ("saved", 3) and loaded.weights[NUMPY_KEY].tolist() == [3, 3, 3]


def test_the_starting_model_is_the_default_the_configured_list_or_a_checkpoint(tmp_path: Path) -> None:
    default = make(tmp_path).load()
    assert (default.source, default.last_round) == ("default", None)
    assert default.weights[NUMPY_KEY].dtype == np.float32 and default.weights[NUMPY_KEY].tolist() == DEFAULT_MODEL
    configured = NPModelPersistor(job_dir(tmp_path), model=[[1, 2], [3, 4]]).load()
    assert configured.source == "config" and configured.weights[NUMPY_KEY].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    ckpt = tmp_path / "start.npz"
    np.savez(ckpt, a=np.ones(2), b=np.zeros(3))
    from_ckpt = NPModelPersistor(job_dir(tmp_path), model=[[9]], source_ckpt_file_full_name=str(ckpt)).load()
    assert from_ckpt.source == "checkpoint" and set(from_ckpt.weights) == {"a", "b"}
    with pytest.raises(SagmqError, match="does not exist"):
        NPModelPersistor(job_dir(tmp_path), source_ckpt_file_full_name=str(tmp_path / "nope.npy")).load()
    with pytest.raises(SagmqError, match="not numeric"):
        NPModelPersistor(job_dir(tmp_path), model=[["x"]]).load()


def test_a_saved_model_wins_and_several_variables_are_saved_as_npz(tmp_path: Path) -> None:
    st = NPModelPersistor(job_dir(tmp_path), "models", "server.npz", model=[[1.0]])
    st.save(0, {"w": np.ones(2, np.float32), "b": np.zeros(1, np.float32)})
    assert (job_dir(tmp_path) / "models" / "round-0.npz").samefile(job_dir(tmp_path) / "models" / "server.npz")
    loaded = NPModelPersistor(job_dir(tmp_path), "models", "server.npz", model=[[1.0]]).load()
    assert (loaded.source, loaded.last_round) == ("saved", 0) and set(loaded.weights) == {"w", "b"}


def test_the_file_name_says_the_format_npy_for_one_array_npz_for_several(tmp_path: Path) -> None:
    st = make(tmp_path)  # model_name server.npy, as NVFlare's default
    models = job_dir(tmp_path) / "models"
    st.save(0, {NUMPY_KEY: np.arange(3, dtype=np.int64)})
    assert sorted(p.name for p in models.iterdir()) == ["round-0.npy", "server.npy"]
    st.save(1, {NUMPY_KEY: np.ones(3), "extra": np.zeros(2)})  # a variable the aggregate added
    assert sorted(p.name for p in models.iterdir()) == ["round-0.npy", "round-1.npz", "server.npz"]
    with np.load(models / "server.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["extra", NUMPY_KEY]
    assert sorted(make(tmp_path).files()) == ["models/round-0.npy", "models/round-1.npz", "models/server.npz"]
    loaded = make(tmp_path).load()
    assert (loaded.source, loaded.last_round) == ("saved", 1) and set(loaded.weights) == {"extra", NUMPY_KEY}


def test_a_float_result_for_an_integer_model_is_saved_as_float(tmp_path: Path) -> None:
    st = make(tmp_path)
    st.save(0, {NUMPY_KEY: np.array([2.5, 4.0])})  # NVFlare's mean of int64 [1, 2] and [4, 6]
    saved = np.load(job_dir(tmp_path) / "models" / "server.npy")
    assert saved.dtype == np.float64 and saved.tolist() == [2.5, 4.0]


@pytest.mark.parametrize(("n", "resumed"), [(1, 4), (2, 3), (3, 2), (4, 3), (6, None), (0, None)])
def test_snapshot_every_n_rounds_sets_the_round_a_job_resumes_after(tmp_path: Path, n: int,
                                                                    resumed: int | None) -> None:
    st = make(tmp_path)
    for r in range(5):  # rounds 0..4 saved, each model full of its round number
        st.save(r, {NUMPY_KEY: np.full(2, r, np.float32)})
    loaded = make(tmp_path).load(snapshot_every_n_rounds=n)
    if resumed is None:  # no snapshot-due round saved (or snapshots off): the job starts over
        assert (loaded.source, loaded.last_round) == ("default", None)
    else:  # NVFlare snapshots after round r when (r + 1) % n == 0: the last such round's model
        assert (loaded.source, loaded.last_round) == ("saved", resumed)
        assert loaded.weights[NUMPY_KEY].tolist() == [resumed, resumed]


def test_a_job_with_nothing_has_nothing_to_download(tmp_path: Path) -> None:
    with pytest.raises(SagmqError, match=f"nothing for job {JOB}"):
        make(tmp_path).files()


def test_download_writes_the_persistors_names_and_shows_an_npz_model(tmp_path: Path) -> None:
    from sagmq.cli.jobs import final_model_text, write_files

    st = make(tmp_path)
    st.save(0, {"w": np.ones(2, np.float32), "b": np.array([2.5])})
    out = tmp_path / "out"
    write_files(out, st.files())  # what `sagmq download --out` writes
    assert (out / "models" / "server.npz").is_file() and not (out / "models" / "server.npy").exists()
    text = final_model_text(out)
    assert text.startswith(f"final model {out / 'models' / 'server.npz'}:") and "w:\n[1. 1.]" in text
    assert "b:\n[2.5]" in text


def test_history_json_is_one_round_record_per_line_and_reads_back() -> None:
    from sagmq.persistor.np_model_persistor import history_json

    records = [{"round": r, "accepted": ["site-1", "site-2"], "seconds": 0.25 * r, "metrics": {"site-1": {"loss": 1.5}}}
               for r in range(3)]
    text = history_json(records).decode()
    assert json.loads(text) == records
    lines = text.splitlines()
    assert lines[0] == "[" and lines[-1] == "]" and len(lines) == 2 + len(records)
    assert json.loads(history_json([])) == []
