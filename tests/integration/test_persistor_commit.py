"""The persistor saves a round's aggregate (routed to it as round.aggregated.save) on model.commit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from sagmq.amqp import AmqpBus
from sagmq.persistor.main import PersistorService
from sagmq.wire.bus import Delivery
from sagmq.wire.codec import DXO, WEIGHTS
from sagmq.wire.messages import JobEvent, ModelCommit, ModelSave, ModelSaved, RoundAggregated
from sagmq.wire.settings import Settings
from sagmq.wire.topology import (
    RK_MODEL_COMMIT,
    RK_MODEL_SAVE,
    RK_ROUND_AGGREGATED_SAVE,
    rk_job,
    service_topology,
)
from tests.conftest import service_thread, wait_for

pytestmark = pytest.mark.broker

JOB = "0123456789abcdef0123456789abcdef"


def persistor(settings: Settings) -> Any:
    return service_thread("persistor", settings, lambda bus: PersistorService(settings, bus),
                          lambda svc, _bus: svc.run())


class Driver:
    """Plays the server and the aggregator: publishes, and collects model.saved."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.bus = AmqpBus(settings, "driver", connect_timeout_s=5).connect()
        self.bus.declare(service_topology(settings.prefix))
        self.saved: list[ModelSaved] = []
        self.bus.consume(self.bus.names.server_queue, self._on_server, prefetch=0)

    def _on_server(self, d: Delivery) -> None:
        if d.msg_type == ModelSaved.TYPE:
            self.saved.append(d.message(ModelSaved, self.s.max_body_bytes))

    def aggregate(self, rnd: int, task_id: str, values: np.ndarray, commits: str = "") -> None:
        m = RoundAggregated(JOB, rnd, ["site-1"], DXO(WEIGHTS, {"numpy_key": values}), task_id, commits)
        self.bus.publish(self.bus.names.events, RK_ROUND_AGGREGATED_SAVE, m)

    def commit(self, rnd: int, task_id: str, final: bool = False) -> None:
        self.bus.publish(self.bus.names.events, RK_MODEL_COMMIT,
                         ModelCommit(JOB, rnd, task_id, history=[{"round": rnd, "accepted": ["site-1"]}],
                                     final=final))

    def wait_saved(self, n: int) -> list[ModelSaved]:
        def saved() -> bool:
            self.bus.process(0.05)
            return len(self.saved) >= n

        wait_for(saved, 20, f"{n} model.saved")
        return self.saved

    def queue_count(self, queue: str) -> int:
        return int(self.bus.channel.queue_declare(queue, passive=True).method.message_count)


@pytest.fixture
def fast(settings: Settings) -> Settings:
    return replace(settings, chunk_bytes=64 * 1024, chunk_timeout_s=1.0)  # a 400 KB model comes in parts


@pytest.fixture
def driver(fast: Settings) -> Iterator[Driver]:
    d = Driver(fast)
    yield d
    d.bus.close()


def model_file(settings: Settings) -> np.ndarray:
    model: np.ndarray = np.load(settings.workspace / "persistor" / "jobs" / JOB / "models" / "server.npy")
    return model


def values(x: float) -> np.ndarray:
    return np.full(100_000, x, dtype=np.float32)


def nothing_left_behind(driver: Driver) -> None:
    """Once the persistor is gone, nothing it held comes back: everything was acked."""
    assert driver.queue_count(driver.bus.names.persistor_queue) == 0


@pytest.mark.parametrize("commit_first", [False, True], ids=["aggregate-then-commit", "commit-then-aggregate"])
def test_the_committed_aggregate_is_saved_as_the_model(fast: Settings, driver: Driver, commit_first: bool) -> None:
    with persistor(fast):
        if commit_first:
            driver.commit(0, "t0")
            driver.aggregate(0, "t0", values(1.5))
        else:
            driver.aggregate(0, "t0", values(1.5))
            driver.commit(0, "t0")
        saved = driver.wait_saved(1)
        assert (saved[0].job_id, saved[0].round) == (JOB, 0) and saved[0].path.endswith("server.npy")
        np.testing.assert_array_equal(model_file(fast), values(1.5))
        job_dir = fast.workspace / "persistor" / "jobs" / JOB
        assert (job_dir / "models" / "round-0.npy").samefile(job_dir / "models" / "server.npy")
        assert json.loads((job_dir / "history.json").read_text()) == [{"round": 0, "accepted": ["site-1"]}]
    nothing_left_behind(driver)


def test_a_newer_aggregate_of_the_round_replaces_the_held_one(fast: Settings, driver: Driver) -> None:
    with persistor(fast) as svc:
        driver.aggregate(1, "first-try", values(1.0))  # the round ran again (say, after a server restart)
        driver.aggregate(1, "second-try", values(2.0))
        driver.commit(1, "second-try")
        driver.wait_saved(1)
        np.testing.assert_array_equal(model_file(fast), values(2.0))
        driver.aggregate(2, "t2", values(3.0))  # an aggregate that is never committed: the job fails
        wait_for(lambda: JOB in svc.aggregates, 10, "the aggregate of round 2 to be held")
        driver.bus.publish(driver.bus.names.events, rk_job("failed"), JobEvent(JOB, "x", "failed", "why"))
        wait_for(lambda: JOB not in svc.aggregates, 10, "the held aggregate to go with the job")
    nothing_left_behind(driver)


def test_a_full_save_of_the_round_lets_its_held_aggregate_go(fast: Settings, driver: Driver) -> None:
    with persistor(fast):
        driver.aggregate(0, "t0", values(1.0))
        driver.bus.publish(driver.bus.names.events, RK_MODEL_SAVE,
                           ModelSave(JOB, 0, DXO(WEIGHTS, {"numpy_key": values(7.0)})))
        driver.wait_saved(1)
        np.testing.assert_array_equal(model_file(fast), values(7.0))
    nothing_left_behind(driver)


def test_a_commit_of_a_saved_round_is_confirmed_again(fast: Settings, driver: Driver) -> None:
    with persistor(fast):
        driver.aggregate(0, "t0", values(1.0))
        driver.commit(0, "t0")
        driver.wait_saved(1)
        driver.commit(0, "t0")  # redelivered after the save, say: its aggregate is long gone
        saved = driver.wait_saved(2)
        assert [(m.round, m.path) for m in saved] == [(0, saved[0].path)] * 2
    nothing_left_behind(driver)


def test_a_commit_whose_aggregate_never_comes_is_dead_lettered_with_a_reason(fast: Settings,
                                                                            driver: Driver) -> None:
    with persistor(fast):
        driver.commit(3, "t3")
        dead: list[Any] = []

        def look() -> bool:
            method, props, _ = driver.bus.channel.basic_get(driver.bus.names.dead_queue, auto_ack=True)
            if method is not None:
                dead.append(props.headers)
            return bool(dead)

        wait_for(look, 20, "the dead-lettered commit")
        reason = dead[0]["x-sagmq-reason"]
        reason = reason.decode() if isinstance(reason, bytes) else reason
        assert "model.commit for round 3" in reason and "did not come within 1 s" in reason
        assert driver.saved == []
    nothing_left_behind(driver)


def test_saves_in_a_burst_are_confirmed_once_a_second_and_the_final_one_at_once(fast: Settings,
                                                                               driver: Driver) -> None:
    with persistor(fast):
        for rnd in range(3):
            driver.aggregate(rnd, f"t{rnd}", values(float(rnd)))
            driver.commit(rnd, f"t{rnd}")
        driver.wait_saved(2)
        # round 0 at once; rounds 1 and 2 within the second after it, in one model.saved for round 2
        assert [m.round for m in driver.saved] == [0, 2]
        np.testing.assert_array_equal(model_file(fast), values(2.0))
        driver.aggregate(3, "t3", values(3.0))
        driver.commit(3, "t3", final=True)  # the job's last round: the server is waiting
        driver.wait_saved(3)
        assert driver.saved[-1].round == 3
        for r in range(4):  # every round still has its snapshot
            assert (fast.workspace / "persistor" / "jobs" / JOB / "models" / f"round-{r}.npy").exists()
    nothing_left_behind(driver)


def snapshot(settings: Settings, rnd: int) -> np.ndarray:
    model: np.ndarray = np.load(settings.workspace / "persistor" / "jobs" / JOB / "models" / f"round-{rnd}.npy")
    return model


def test_an_aggregate_built_on_the_held_one_commits_it(fast: Settings, driver: Driver) -> None:
    small = replace(fast, chunk_bytes=1 << 20)  # whole messages, as small models travel
    with persistor(small) as svc:
        driver.aggregate(0, "t0", values(0.5))
        driver.commit(0, "t0")  # the first round of a run is committed by a model.commit
        driver.wait_saved(1)
        driver.aggregate(1, "t1", values(1.5))  # the server sent no commit for round 1: ...
        driver.aggregate(2, "t2", values(2.5), commits="t1")  # ... round 2 was opened on it
        wait_for(lambda: svc.persistor(JOB).last_round() == 1, 10, "round 1 to be saved")
        np.testing.assert_array_equal(snapshot(small, 1), values(1.5))
        driver.aggregate(3, "t3", values(3.5), commits="some-other-task")  # not what is held: not saved
        wait_for(lambda: JOB in svc.aggregates and svc.aggregates[JOB].msg.round == 3, 10, "round 3 held")
        assert svc.persistor(JOB).last_round() == 1
        assert not (small.workspace / "persistor" / "jobs" / JOB / "models" / "round-2.npy").exists()
        driver.commit(3, "t3", final=True)
        saved = driver.wait_saved(2)
        assert saved[-1].round == 3 and saved[-1].path.endswith("server.npy")
        np.testing.assert_array_equal(model_file(small), values(3.5))
    nothing_left_behind(driver)


def test_a_restarted_persistor_commits_to_where_the_job_was_saved(fast: Settings, driver: Driver) -> None:
    small = replace(fast, chunk_bytes=1 << 20)
    with persistor(small):
        driver.bus.publish(driver.bus.names.events, RK_MODEL_COMMIT,
                           ModelCommit(JOB, 0, "t0", "elsewhere", "m.npy"))
        driver.aggregate(0, "t0", values(0.5))
        driver.wait_saved(1)
        driver.aggregate(1, "t1", values(1.5))
    # a new persistor process: round 1's aggregate comes again, then round 2's, built on it
    with persistor(small) as svc:
        wait_for(lambda: JOB in svc.aggregates, 10, "round 1 held again")
        driver.aggregate(2, "t2", values(2.5), commits="t1")
        wait_for(lambda: svc.persistor(JOB).last_round() == 1, 10, "round 1 to be saved")
        folder = small.workspace / "persistor" / "jobs" / JOB / "elsewhere"
        np.testing.assert_array_equal(np.load(folder / "m.npy"), values(1.5))
        assert (folder / "round-1.npy").samefile(folder / "m.npy")
        driver.bus.publish(driver.bus.names.events, rk_job("finished"), JobEvent(JOB, "x", "finished"))
        wait_for(lambda: JOB not in svc.aggregates, 10, "the held aggregate to go with the job")
    nothing_left_behind(driver)
