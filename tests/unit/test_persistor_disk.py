"""A persistor whose disk refuses saves (issue 11, failure 3), without a broker: the persistor on a
memory bus with a fake clock and a disk that raises OSError until it is repaired, and the round
core's side (what `sagmq status` shows, the job failing with the persistor's error)."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import sagmq.persistor.np_model_persistor as npmp
from sagmq.memory import MemoryBroker, MemoryBus
from sagmq.persistor.main import LOG_REPEAT_S, REPORT_EVERY_S, PersistorService, RepeatLog, describe
from sagmq.server.scatter_and_gather import PERSISTOR_RETRY_S, PERSISTOR_TIMEOUT_S, EndJob, Persist, Phase
from sagmq.wire.codec import DXO, WEIGHTS
from sagmq.wire.messages import FAILED, FINISHED, ModelCommit, ModelSave, ModelSaved, RoundAggregated
from sagmq.wire.settings import Settings
from sagmq.wire.topology import RK_MODEL_COMMIT, RK_MODEL_SAVE, RK_ROUND_AGGREGATED_SAVE
from tests.unit.choreography.harness import Probe, service_bus
from tests.unit.test_scatter_and_gather import JOB, Driver, end, spec

JOB_ID = "d" * 32
BASE = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.float32)
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


class Disk:
    """atomic_write_with of the model store, failing with `error` while it is set; records each try."""

    def __init__(self, real: Callable[..., None]) -> None:
        self.real = real
        self.error: OSError | None = None
        self.tries: list[tuple[float, str]] = []  # (clock, file name) of each model write tried
        self.clock = 0.0

    def __call__(self, path: Path, write: Callable[..., object], also: Path | None = None, sync: bool = True) -> None:
        self.tries.append((self.clock, also.name if also is not None else path.name))
        if self.error is not None:
            raise self.error
        self.real(path, write, also=also, sync=sync)


class Rig:
    """A persistor driven by hand: deliveries served on demand, ticks at fake times."""

    def __init__(self, broker: MemoryBroker, settings: Settings, disk: Disk) -> None:
        self.settings = settings
        self.disk = disk
        self.probe = Probe(broker, settings)
        self.bus: MemoryBus = service_bus(broker, settings, "persistor")
        self.svc = PersistorService(settings, self.bus)
        self.svc.clock = lambda: disk.clock
        self.bus.consume(self.bus.names.persistor_queue, self.svc.on_message, prefetch=0)

    def publish(self, rk: str, msg: Any, rnd: int) -> None:
        self.probe.bus.publish(self.probe.names.events, rk, msg, headers={"job_id": JOB_ID, "round": rnd})
        self.bus.process(0)

    def save(self, rnd: int, final: bool = False) -> None:
        self.publish(RK_MODEL_SAVE, ModelSave(JOB_ID, rnd, DXO(WEIGHTS, {"numpy_key": BASE + rnd}), final=final), rnd)

    def tick(self, at: float) -> None:
        self.disk.clock = at
        self.svc.tick()
        self.bus.process(0)

    def reports(self) -> list[ModelSaved]:
        self.probe.bus.process(0)
        return self.probe.all(ModelSaved)

    def dead(self) -> list[str]:
        self.probe.bus.process(0)
        return [d.header_str("x-sagmq-reason") for d in self.probe.got if d.exchange == self.probe.names.dead]

    def unacked(self) -> int:
        return len(self.bus._unacked)  # (the memory bus's own count of what its consumers hold)

    def models(self) -> Path:
        return self.settings.workspace / "persistor" / "jobs" / JOB_ID / "models"


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Disk:
    d = Disk(npmp.atomic_write_with)
    monkeypatch.setattr(npmp, "atomic_write_with", d)
    return d


@pytest.fixture
def rig(tmp_path: Path, disk: Disk) -> Iterator[Rig]:
    settings = Settings(prefix="t", workspace=tmp_path / "ws", persist_retry_limit_s=300.0)
    r = Rig(MemoryBroker(), settings, disk)
    yield r
    r.bus.close()


def model_tries(disk: Disk) -> list[float]:
    return [t for t, _ in disk.tries]


# --- the persistor ---------------------------------------------------------------------------------


def test_a_refused_save_is_held_retried_with_capped_backoff_and_confirmed_once_written(rig: Rig, disk: Disk) -> None:
    disk.error = ENOSPC
    rig.save(0, final=True)
    (report,) = rig.reports()
    assert report.round == 0 and not report.gave_up
    assert report.error == f"[Errno 28] No space left on device: {rig.models() / 'server.npy'}"
    assert rig.unacked() == 1 and rig.dead() == []  # held, not dead-lettered
    for t in np.arange(0.5, 60.0, 0.5):
        rig.tick(float(t))
    assert model_tries(disk) == [0.0, 1.0, 3.0, 7.0, 15.0, 25.0, 35.0, 45.0, 55.0]  # 1 s doubling to 10 s
    disk.error = None
    rig.tick(65.0)
    assert rig.unacked() == 0 and rig.dead() == []
    last = rig.reports()[-1]
    assert (last.round, last.error) == (0, "")  # the plain confirmation
    np.testing.assert_array_equal(np.load(rig.models() / "server.npy"), BASE)
    assert rig.svc.stalled == {}


def test_later_saves_wait_in_order_behind_a_refused_one(rig: Rig, disk: Disk) -> None:
    disk.error = ENOSPC
    rig.save(0)
    rig.save(1)
    rig.save(2, final=True)
    assert [name for _, name in disk.tries] == ["round-0.npy"]  # no later round goes before the refused one
    assert rig.unacked() == 3
    disk.error = None
    rig.tick(1.0)
    assert [name for _, name in disk.tries] == ["round-0.npy", "round-0.npy", "round-1.npy", "round-2.npy"]
    assert rig.unacked() == 0
    for r in range(3):
        np.testing.assert_array_equal(np.load(rig.models() / f"round-{r}.npy"), BASE + r)
    np.testing.assert_array_equal(np.load(rig.models() / "server.npy"), BASE + 2)
    assert [(m.round, m.error) for m in rig.reports()][-1] == (2, "")


def test_a_commit_of_a_held_aggregate_is_retried_too(rig: Rig, disk: Disk) -> None:
    disk.error = OSError(errno.EROFS, "Read-only file system")
    agg = RoundAggregated(JOB_ID, 0, ["site-1"], DXO(WEIGHTS, {"numpy_key": BASE + 7}), "t0")
    rig.publish(RK_ROUND_AGGREGATED_SAVE, agg, 0)
    rig.publish(RK_MODEL_COMMIT, ModelCommit(JOB_ID, 0, "t0", final=True), 0)
    assert "[Errno 30] Read-only file system" in rig.reports()[0].error
    assert rig.unacked() == 2  # the aggregate and the commit
    disk.error = None
    rig.tick(1.0)
    assert rig.unacked() == 0
    np.testing.assert_array_equal(np.load(rig.models() / "round-0.npy"), BASE + 7)


def test_the_server_is_told_at_once_at_each_new_error_and_every_10_s(rig: Rig, disk: Disk) -> None:
    disk.error = ENOSPC
    rig.save(0, final=True)
    for t in range(1, 31):
        rig.tick(float(t))
    disk.error = OSError(errno.EIO, "Input/output error")
    rig.tick(35.0)
    times = [m.retrying_s for m in rig.reports()]
    assert times == [0.0, REPORT_EVERY_S, 2 * REPORT_EVERY_S, 3 * REPORT_EVERY_S, 35.0]
    assert "[Errno 5]" in rig.reports()[-1].error


def test_past_the_limit_the_held_saves_are_dead_lettered_and_the_server_told(tmp_path: Path, disk: Disk) -> None:
    settings = Settings(prefix="t", workspace=tmp_path / "ws", persist_retry_limit_s=30.0)
    rig = Rig(MemoryBroker(), settings, disk)
    disk.error = ENOSPC
    rig.save(0)
    rig.save(1, final=True)
    for t in range(1, 40):
        rig.tick(float(t))
    last = rig.reports()[-1]
    assert last.gave_up and last.round == 0 and "[Errno 28] No space left on device" in last.error
    assert last.retrying_s >= 30.0
    dead = rig.dead()
    assert len(dead) == 2 and all("SAGMQ_PERSIST_RETRY_LIMIT_S=30" in r and "Errno 28" in r for r in dead)
    assert rig.unacked() == 0 and rig.svc.stalled == {}
    tried = len(disk.tries)
    rig.save(2, final=True)  # the job failed: a later save that the disk refuses is not retried again
    assert len(disk.tries) == tried + 1 and rig.reports()[-1].gave_up and len(rig.dead()) == 3
    rig.bus.close()


def test_a_limit_of_zero_gives_up_at_the_first_refusal(tmp_path: Path, disk: Disk) -> None:
    rig = Rig(MemoryBroker(), Settings(prefix="t", workspace=tmp_path / "ws", persist_retry_limit_s=0.0), disk)
    disk.error = ENOSPC
    rig.save(0, final=True)
    (report,) = rig.reports()
    assert report.gave_up and len(rig.dead()) == 1
    rig.bus.close()


def test_a_refusal_after_the_disk_took_a_save_starts_the_limit_afresh(tmp_path: Path, disk: Disk) -> None:
    rig = Rig(MemoryBroker(), Settings(prefix="t", workspace=tmp_path / "ws", persist_retry_limit_s=30.0), disk)
    disk.error = ENOSPC
    rig.save(0)
    rig.save(1, final=True)
    for t in range(1, 26):  # tried at 0, 1, 3, 7, 15, 25: next at 35
        rig.tick(float(t))
    real, disk.error = disk.real, None

    def full(*args: object, **kwargs: object) -> None:
        raise ENOSPC

    def one_more_file(path: Path, write: Callable[..., object], also: Path | None = None, sync: bool = True) -> None:
        disk.real = full  # then full again
        real(path, write, also=also, sync=sync)

    disk.real = one_more_file
    rig.tick(35.0)  # round 0 written, round 1 refused: the limit counts 30 s from now
    for t in range(36, 65):
        rig.tick(float(t))
    assert not any(m.gave_up for m in rig.reports()) and rig.unacked() == 1
    disk.real = real
    rig.tick(70.0)
    assert rig.unacked() == 0 and rig.dead() == []
    np.testing.assert_array_equal(np.load(rig.models() / "server.npy"), BASE + 1)
    rig.bus.close()


def test_each_distinct_error_is_logged_once_and_repeats_once_a_minute(rig: Rig, disk: Disk,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="sagmq.persistor.main")
    disk.error = ENOSPC
    rig.save(0, final=True)
    for t in range(1, 131):
        rig.tick(float(t))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines  # the first, then a line a minute with the count
    assert all("No space left on device" in x for x in lines)
    assert "time(s) in the last" in lines[1]
    disk.error = OSError(errno.EIO, "Input/output error")
    rig.tick(140.0)
    assert "Input/output error" in caplog.records[-1].getMessage()  # a new error is news at once


def test_repeat_log_counts_repeats_between_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="sagmq.persistor.main")
    rl = RepeatLog()
    for t in range(0, 121, 10):
        rl.error("k", float(t), "disk says %s", "no")
    assert [r.getMessage() for r in caplog.records] == [
        "disk says no", "disk says no (6 time(s) in the last 60 s)", "disk says no (6 time(s) in the last 60 s)"]
    rl.forget(lambda k: k == "k")
    rl.error("k", 125.0, "disk says %s", "again")
    assert caplog.records[-1].getMessage() == "disk says again"
    assert LOG_REPEAT_S == 60.0


def test_an_error_naming_a_temporary_file_names_the_model_file(tmp_path: Path) -> None:
    target = tmp_path / "models" / "server.npy"
    tmp = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "models" / ".server.npy.x1y2.tmp"))
    assert describe(tmp, target) == f"[Errno 28] No space left on device: {target}"
    folder = OSError(errno.EEXIST, "File exists", str(tmp_path / "models"))
    assert describe(folder, target) == f"[Errno 17] File exists: {tmp_path / 'models'}"


# --- the round core ---------------------------------------------------------------------------------


def refused(rnd: int, error: str = "[Errno 28] No space left on device: /p/models/server.npy",
            retrying_s: float = 0.0, gave_up: bool = False) -> ModelSaved:
    return ModelSaved(JOB, rnd, "/p/models/server.npy", error, retrying_s, gave_up)


def test_status_says_what_a_saving_job_waits_for_and_why() -> None:
    d = Driver(spec(num_rounds=1))
    d.load()
    d.aggregate()
    assert d.sag.phase == Phase.SAVING
    assert d.sag.waiting_for(d.now) == "persistor: model.saved of the final round 0 (for 0 s)"
    assert d.sag.on_saved(refused(0, retrying_s=2.0), d.now) == []
    d.at(10.0)
    assert d.sag.waiting_for(d.now) == ("persistor: [Errno 28] No space left on device: /p/models/server.npy "
                                        "(retrying since 12 s)")
    assert d.sag.history[0].saved_at is None  # a refusal saves nothing
    assert d.sag.on_saved(ModelSaved(JOB, 0, "p"), d.now) == [EndJob(FINISHED)]
    assert d.sag.persistor_trouble is None


def test_status_names_a_refused_save_of_an_earlier_round_while_training() -> None:
    d = Driver(spec(num_rounds=3))
    d.load()
    d.aggregate()
    d.sag.on_saved(refused(0), d.now)
    assert d.sag.phase == Phase.TRAINING
    text = d.sag.waiting_for(d.now)
    assert text.startswith("sites: results of round 1 from a, b, c") and "persistor: [Errno 28]" in text
    d.sag.on_saved(ModelSaved(JOB, 0, "p"), d.now)
    assert "persistor" not in d.sag.waiting_for(d.now)


def test_the_job_fails_with_the_persistors_error_when_it_gives_up() -> None:
    d = Driver(spec(num_rounds=3))
    d.load()
    d.aggregate()
    d.sag.on_saved(refused(0), d.now)
    e = end(d.sag.on_saved(refused(0, retrying_s=300.0, gave_up=True), d.now))
    assert e.status == FAILED
    assert e.reason == ("round 0: the persistor could not save the model and gave up after retrying for 300 s: "
                        "[Errno 28] No space left on device: /p/models/server.npy")


def test_a_retrying_persistor_gets_no_resend_and_its_last_word_starts_the_limit() -> None:
    d = Driver(spec(num_rounds=1))
    d.load()
    d.aggregate()
    d.sag.on_saved(refused(0), d.now)
    d.at(PERSISTOR_RETRY_S + 1)
    assert d.tick() == []  # the final model again would only queue behind the one it retries
    d.at(PERSISTOR_TIMEOUT_S - 10)
    d.sag.on_saved(refused(0, retrying_s=PERSISTOR_TIMEOUT_S - 10), d.now)  # still retrying: still alive
    d.at(PERSISTOR_TIMEOUT_S + 10)
    assert d.tick() == []
    d.at(2 * PERSISTOR_TIMEOUT_S - 10)
    e = end(d.tick())
    assert e.status == FAILED and "has said nothing for 600 s" in e.reason and "Errno 28" in e.reason
    assert not any(isinstance(x, Persist) for x in d.tick())
