"""ScatterAndGather, the pure round core: every rule driven with a fake clock, no broker, no sleeps."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from sagmq.job.spec import AggregatorConfig, JobSpec, PersistorConfig, SAGConfig
from sagmq.server.scatter_and_gather import (
    COMMIT_EVERY_S,
    PERSISTOR_RETRY_S,
    PERSISTOR_TIMEOUT_S,
    ROUND_CLOSE_RESEND_S,
    CloseRound,
    ControlSites,
    Effect,
    EndJob,
    LoadModel,
    OpenRound,
    Persist,
    Phase,
    Rejection,
    RoundRecord,
    ScatterAndGather,
    SendTask,
    SiteState,
    should_persist,
)
from sagmq.wire.codec import DXO, WEIGHT_DIFF, WEIGHTS
from sagmq.wire.messages import (
    ABORTED,
    FAILED,
    FINISHED,
    RC_EXECUTION_EXCEPTION,
    RC_OK,
    RC_TASK_ABORTED,
    RC_UNSAFE_JOB,
    Contribution,
    ModelCommit,
    ModelLoaded,
    ModelSave,
    ModelSaved,
    RoundAggregated,
)

T0 = 1000.0
WALL = 1_700_000_000.0  # wall time = monotonic + this
JOB = "job-1"
SITES = ("a", "b", "c")
SMALL = {"w": np.zeros((3, 3), np.float32)}
LARGE = {"w": np.zeros(300_000, np.float32)}  # 1.2 MB: forwarded, never an implied commit
HEARTBEAT_S = 2.0


def spec(min_clients: int = 3, num_rounds: int = 3, start_round: int = 0, wait: float = 10.0,
         train_timeout: float = 0.0, ire: bool | None = None, persist_n: int = 1, kind: str = WEIGHTS,
         persistor: bool = True, deploy_map: dict[str, list[str]] | None = None) -> JobSpec:
    sag = SAGConfig(min_clients=min_clients, num_rounds=num_rounds, start_round=start_round,
                    wait_time_after_min_received=wait, train_timeout=train_timeout, ignore_result_error=ire,
                    persist_every_n_rounds=persist_n)
    return JobSpec("job", {}, deploy_map or {"app": ["@ALL"]}, min_clients, "app", sag,
                   AggregatorConfig(expected_data_kind=kind), PersistorConfig() if persistor else None, {})


class Driver:
    """One ScatterAndGather, a fake clock and the sites it can see."""

    def __init__(self, s: JobSpec | None = None, model: dict[str, np.ndarray] | None = None,
                 history: list[RoundRecord] | None = None, forward_min_bytes: int = 1 << 20,
                 sites: tuple[str, ...] = SITES) -> None:
        self.spec = s or spec()
        self.model = {k: v.copy() for k, v in (model or SMALL).items()}
        self.sag = ScatterAndGather(JOB, self.spec, heartbeat_s=HEARTBEAT_S, schedule_timeout_s=60.0,
                                    forward_min_bytes=forward_min_bytes, wall_offset=WALL, history=history or [])
        self.now = T0
        self.alive: set[str] = set(sites)
        self.states: dict[str, SiteState] = {}

    def at(self, dt: float) -> float:
        """Move the clock to T0 + dt."""
        self.now = T0 + dt
        return self.now

    def start(self) -> list[Effect]:
        return self.sag.start(self.now, self.alive)

    def load(self, source: str = "initial", next_round: int = -1,
             history: list[dict[str, Any]] | None = None) -> list[Effect]:
        self.start()
        loaded = ModelLoaded(JOB, source, DXO(WEIGHTS, self.model), next_round, history=history or [])
        return self.sag.on_loaded(loaded, self.now)

    def verdict(self, site: str, accepted: bool = True, rc: str = RC_OK, reason: str = "",
                rnd: int | None = None) -> list[Effect]:
        r = self.sag.round if rnd is None else rnd
        assert r is not None
        return self.sag.on_contribution(Contribution(JOB, r, site, accepted, rc, reason, self.sag.task_id), self.now)

    def aggregate(self, accepted: tuple[str, ...] = SITES, dxo: DXO | None = None,
                  task_id: str | None = None) -> list[Effect]:
        r = self.sag.round
        assert r is not None
        if dxo is None:
            dxo = DXO(WEIGHTS, {k: v + 1 for k, v in self.sag.weights.items()})
        return self.sag.on_aggregated(
            RoundAggregated(JOB, r, list(accepted), dxo, self.sag.task_id if task_id is None else task_id), self.now)

    def tick(self) -> list[Effect]:
        return self.sag.on_tick(self.now, self.alive, self.states)

    def beat(self, site: str, busy_round: int = -1, hello: bool = False) -> None:
        """A heartbeat of the site (hello: from a new process of it)."""
        prev = self.states.get(site)
        since = self.now if hello or prev is None else prev.since
        self.states[site] = SiteState(JOB if busy_round >= 0 else "", busy_round, since)


def kinds(effects: list[Effect]) -> list[str]:
    """A compact view of effects: their class names, with the persist message's type."""
    out = []
    for e in effects:
        if isinstance(e, Persist):
            out.append(type(e.message).__name__)
        else:
            out.append(type(e).__name__)
    return out


def only(effects: list[Effect], cls: type[Any]) -> Any:
    found = [e for e in effects if isinstance(e, cls)]
    assert len(found) == 1, effects
    return found[0]


def end(effects: list[Effect]) -> EndJob:
    e = effects[-1]
    assert isinstance(e, EndJob), effects
    return e


# --- start, load, resume -------------------------------------------------------------------------


def test_start_asks_the_persistor_for_the_model() -> None:
    d = Driver()
    (load,) = d.start()
    assert isinstance(load, LoadModel)
    assert load.message.job_id == JOB and load.message.model_name == "server.npy"
    assert d.sag.phase == Phase.LOADING


def test_loaded_model_opens_round_0_and_sends_the_whole_task_once_to_every_alive_site() -> None:
    d = Driver()
    effects = d.load()
    assert kinds(effects) == ["OpenRound", "SendTask"]  # round.open before the task
    opening, send = effects[0], effects[1]
    assert isinstance(opening, OpenRound) and isinstance(send, SendTask)
    assert opening.message.round == 0 and opening.message.targets == ["a", "b", "c"]
    assert opening.message.persist and not opening.message.forward and opening.message.commits == ""
    assert send.sites == ("a", "b", "c") and send.expiration_s is None
    task = send.task
    assert task.round == 0 and task.task_id == opening.message.task_id == d.sag.task_id
    assert task.model_from == "" and task.dxo.kind == WEIGHTS
    np.testing.assert_array_equal(task.dxo.data["w"], SMALL["w"])
    assert task.dxo.meta == {"current_round": 0, "num_rounds": 3}
    assert d.sag.phase == Phase.TRAINING
    assert d.sag.record is not None and d.sag.record.started_at == T0 + WALL


def test_only_sites_the_deploy_map_names_are_targets() -> None:
    d = Driver(spec(min_clients=1, deploy_map={"app": ["b"]}))
    send = only(d.load(), SendTask)
    assert send.sites == ("b",)


def test_train_timeout_is_the_tasks_expiration() -> None:
    d = Driver(spec(train_timeout=30))
    assert only(d.load(), SendTask).expiration_s == 30


def test_a_load_error_fails_the_job() -> None:
    d = Driver()
    d.start()
    effects = d.sag.on_loaded(ModelLoaded(JOB, "error", None, error="disk on fire"), d.now)
    assert end(effects) == EndJob(FAILED, "disk on fire")
    assert d.sag.phase == Phase.DONE


def test_resume_from_a_saved_round_drops_the_history_of_later_rounds() -> None:
    old = [RoundRecord(r, f"t{r}", ["a"], 1.0, ["a"], aggregated=["a"]) for r in range(4)]
    d = Driver(spec(num_rounds=5), history=old)
    effects = d.load(source="saved", next_round=2)
    assert d.sag.round == 2
    assert [h.round for h in d.sag.history] == [0, 1]
    assert only(effects, OpenRound).message.round == 2


def test_resume_takes_the_rounds_its_history_lacks_from_the_persistor() -> None:
    # jobs.json lagged the rounds: this server recorded 0 and 1; the persistor saved up to round 3 and holds
    # the records of rounds 1 to 3 (round 3's only as the persistor's own note of an implied commit)
    ours = [RoundRecord(r, f"t{r}", ["a"], 1.0, ["a"], aggregated=["a"], done_at=2.0) for r in (0, 1)]
    theirs = [{"round": 1, "task_id": "t1-persistor", "accepted": []},
              {"round": 2, "task_id": "t2", "targets": ["a"], "accepted": ["a"], "started_at": 3.0},
              {"round": 2, "task_id": "t2", "accepted": ["a"]},  # a duplicate: one record a round
              {"round": 3, "task_id": "t3", "accepted": ["a"], "aggregated": ["a"], "recorded_by": "persistor"},
              {"round": 4, "task_id": "t4"},  # not saved: runs again
              {"task_id": "no round"}]  # unreadable: skipped
    d = Driver(spec(num_rounds=6), history=ours)
    d.load(source="saved", next_round=4, history=theirs)
    assert [(h.round, h.task_id) for h in d.sag.history] == [(0, "t0"), (1, "t1"), (2, "t2"), (3, "t3")]
    assert d.sag.history[1].done_at == 2.0  # its own record of a round wins
    assert d.sag.history[3].extra == {"recorded_by": "persistor"}
    d.at(2 * COMMIT_EVERY_S)
    commit = only(d.aggregate(), Persist).message
    assert [h["round"] for h in commit.history] == [0, 1, 2, 3, 4]  # the whole history goes back, once a round


def test_resume_ignores_next_round_of_an_initial_model() -> None:
    d = Driver()
    d.load(source="initial", next_round=2)
    assert d.sag.round == 0


def test_resume_after_the_last_round_finishes_at_once() -> None:
    d = Driver(spec(num_rounds=3))
    assert d.load(source="saved", next_round=3) == [EndJob(FINISHED)]


def test_start_round_is_the_first_round() -> None:
    d = Driver(spec(start_round=5, num_rounds=2))
    d.load()
    assert d.sag.round == 5 and d.sag.last_round == 6


# --- closing rules ---------------------------------------------------------------------------------


def test_round_waits_for_every_target_and_the_aggregator_closes_it() -> None:
    d = Driver(spec(min_clients=3))
    d.load()
    for s in SITES:
        assert d.verdict(s) == []  # all answered: the aggregator closes the round by itself
    effects = d.aggregate()
    assert d.sag.round == 1
    rec = d.sag.history[0]
    assert rec.close_reason == "all 3 targets answered" and rec.aggregated == ["a", "b", "c"]
    assert kinds(effects) == ["ModelCommit", "OpenRound", "SendTask"]


def test_nvflares_default_min_clients_keeps_a_round_of_two_sites_waiting() -> None:
    d = Driver(JobSpec("job", {}, {"app": ["@ALL"]}, 2, "app", SAGConfig(), AggregatorConfig(WEIGHTS),
                       PersistorConfig(), {}), sites=("a", "b"))
    assert d.load() == []
    assert d.sag.phase == Phase.WAITING  # ScatterAndGather's min_clients (1000), not meta.json's, opens rounds


def test_min_clients_then_wait_time_after_min_received() -> None:
    d = Driver(spec(min_clients=2, wait=10.0))
    d.load()
    d.at(1)
    assert d.verdict("a") == []
    d.at(5)
    assert d.verdict("b") == []  # min reached now: the wait starts
    d.at(14.999)
    assert d.tick() == []
    d.at(15)
    close = only(d.tick(), CloseRound).message
    assert "wait_time_after_min_received (10 s) passed" in close.reason and "2 answered" in close.reason
    assert close.expected == ["a", "b"]
    assert d.sag.phase == Phase.AGGREGATING
    assert d.sag.record is not None and d.sag.record.close_reason == close.reason


def test_wait_time_counts_from_when_min_was_reached() -> None:
    d = Driver(spec(min_clients=2, wait=10.0), sites=("a", "b", "c", "d"))
    d.load()
    d.verdict("a")
    d.at(2)
    d.verdict("b")
    d.at(9)
    d.verdict("c")
    d.at(11.9)
    assert d.tick() == []
    d.at(12)
    assert kinds(d.tick()) == ["CloseRound"]


def test_wait_time_zero_closes_on_the_contribution_itself() -> None:
    d = Driver(spec(min_clients=1, wait=0.0))
    d.load()
    d.at(3)
    assert kinds(d.verdict("b")) == ["CloseRound"]


def test_rejected_answers_count_towards_min_clients_but_are_not_expected() -> None:
    d = Driver(spec(min_clients=2, wait=1.0))
    d.load()
    d.verdict("a", accepted=False, reason="wrong shape")
    d.verdict("b")
    d.at(1)
    close = only(d.tick(), CloseRound).message
    assert close.expected == ["b"]
    assert d.sag.record is not None and d.sag.record.rejected == [Rejection("a", RC_OK, "wrong shape")]


def test_train_timeout_closes_with_whatever_answered() -> None:
    d = Driver(spec(min_clients=3, train_timeout=60.0))
    d.load()
    d.at(5)
    d.verdict("a")
    d.at(59.9)
    assert d.tick() == []
    d.at(60)
    close = only(d.tick(), CloseRound).message
    assert "train_timeout (60 s) reached with 1 answer(s)" in close.reason


def test_train_timeout_zero_never_closes_by_time() -> None:
    d = Driver(spec(min_clients=3, train_timeout=0.0))
    d.load()
    d.verdict("a")
    for dt in (1.0, 3600.0, 1e7):
        d.at(dt)
        d.beat("b", 0)
        d.beat("c", 0)
        assert d.tick() == []


def test_round_closes_when_every_outstanding_target_stopped_heartbeating() -> None:
    d = Driver()
    d.load()
    d.verdict("a")
    d.alive = {"a", "b"}
    assert d.tick() == []  # b still beats
    d.alive = {"a", "x"}
    close = only(d.tick(), CloseRound).message
    assert "sites b, c stopped answering" in close.reason


def test_duplicate_and_foreign_answers_do_not_count() -> None:
    d = Driver(spec(min_clients=2, wait=0.0, ire=False))
    d.load()
    assert d.verdict("a") == []
    assert d.verdict("a") == []
    assert d.verdict("a", accepted=False, rc=RC_EXECUTION_EXCEPTION) == []  # duplicate: not a failure
    assert d.verdict("x", accepted=False, rc=RC_EXECUTION_EXCEPTION) == []  # not a target
    d.at(100)
    assert d.tick() == []
    assert d.sag.record is not None and d.sag.record.accepted == ["a"]


def test_late_verdicts_are_ignored() -> None:
    d = Driver(spec(min_clients=1, wait=0.0))
    d.load()
    d.verdict("a")  # closes round 0
    assert d.sag.phase == Phase.AGGREGATING
    assert d.verdict("b") == []
    assert d.sag.record is not None and d.sag.record.accepted == ["a"]
    stale = Contribution(JOB, 0, "c", True, RC_OK, "", "another-task")
    assert d.sag.on_contribution(stale, d.now) == []


# --- ignore_result_error and UNSAFE_JOB -----------------------------------------------------------


def test_ignore_result_error_true_ignores_errors() -> None:
    d = Driver(spec(min_clients=3, ire=True))
    d.load()
    for s in SITES:
        effects = d.verdict(s, accepted=False, rc=RC_EXECUTION_EXCEPTION, reason="boom")
        assert not any(isinstance(e, EndJob) for e in effects)
    assert d.sag.phase == Phase.TRAINING


def test_ignore_result_error_false_fails_on_the_first_error() -> None:
    d = Driver(spec(min_clients=1, ire=False))
    d.load()
    d.verdict("a")
    effects = d.verdict("b", accepted=False, rc=RC_TASK_ABORTED, reason="stopped")
    e = end(effects)
    assert e.status == FAILED and "b" in e.reason and RC_TASK_ABORTED in e.reason
    assert "ignore_result_error" in e.reason
    abort = only(effects, ControlSites)
    assert abort.sites == SITES and abort.message.command == "abort" and abort.message.job_id == JOB
    assert d.sag.history[-1].close_reason == "job failed"


def test_ignore_result_error_none_fails_only_below_min_clients() -> None:
    d = Driver(spec(min_clients=3), sites=("a", "b", "c", "d", "e"))
    d.load()
    assert d.verdict("a", accepted=False, rc=RC_EXECUTION_EXCEPTION) == []  # 4 good left
    assert d.verdict("b", accepted=False, rc=RC_EXECUTION_EXCEPTION) == []  # 3 good left == min
    assert d.verdict("c") == []
    e = end(d.verdict("d", accepted=False, rc=RC_EXECUTION_EXCEPTION))  # 2 good left < 3
    assert e.status == FAILED
    assert "remaining good sites (2) < min_clients (3); failed: a, b, d" in e.reason


def test_ignore_result_error_none_rejected_with_rc_ok_is_no_failure() -> None:
    d = Driver(spec(min_clients=3))
    d.load()
    assert d.verdict("a", accepted=False, rc=RC_OK, reason="stale") == []


def test_unsafe_job_fails_it_whatever_ignore_result_error_says() -> None:
    d = Driver(spec(min_clients=1, ire=True))
    d.load()
    e = end(d.verdict("a", accepted=False, rc=RC_UNSAFE_JOB, reason="custom code not allowed"))
    assert e == EndJob(FAILED, "site a refused the job: custom code not allowed")


# --- aggregates -------------------------------------------------------------------------------------


def test_an_aggregate_with_fewer_than_min_clients_fails_the_job() -> None:
    d = Driver(spec(min_clients=2, train_timeout=1.0))
    d.load()
    d.verdict("a")
    d.verdict("b", accepted=False, reason="bad kind")
    d.at(1)
    d.tick()
    effects = d.aggregate(accepted=("a",))
    e = end(effects)
    assert e.status == FAILED
    assert "round 0 ended with 1 accepted result(s), fewer than min_clients=2" in e.reason
    assert "b: bad kind" in e.reason and "train_timeout" in e.reason
    rec = d.sag.history[-1]
    assert rec.aggregated == ["a"] and rec.closed_at == T0 + 1 + WALL and rec.seconds == 1.0


def test_aggregate_applies_weights_and_records_the_round() -> None:
    d = Driver()
    d.load()
    d.at(2)
    d.verdict("a")  # verdicts may trail the aggregate: its list is the truth
    d.aggregate()
    np.testing.assert_array_equal(d.sag.weights["w"], SMALL["w"] + 1)
    rec = d.sag.history[0].to_dict()
    assert rec["accepted"] == ["a", "b", "c"] and rec["aggregated"] == ["a", "b", "c"]
    assert rec["started_at"] == T0 + WALL and rec["closed_at"] == T0 + 2 + WALL and rec["seconds"] == 2.0
    assert rec["done_at"] == T0 + 2 + WALL


def test_weight_diff_aggregate_is_added() -> None:
    d = Driver(spec(kind=WEIGHT_DIFF))
    d.load()
    d.aggregate(dxo=DXO(WEIGHT_DIFF, {"w": np.full((3, 3), 2.0, np.float32)}))
    np.testing.assert_array_equal(d.sag.weights["w"], SMALL["w"] + 2)


def test_an_aggregate_that_cannot_be_applied_fails_the_job() -> None:
    d = Driver(spec(kind=WEIGHT_DIFF))
    d.load()
    e = end(d.aggregate(dxo=DXO(WEIGHT_DIFF, {"nope": np.zeros(1, np.float32)})))
    assert e.status == FAILED and "round 0" in e.reason and "'nope'" in e.reason


def test_an_aggregate_of_another_round_is_ignored() -> None:
    d = Driver()
    d.load()
    stale = RoundAggregated(JOB, 7, list(SITES), DXO(WEIGHTS, SMALL), d.sag.task_id)
    assert d.sag.on_aggregated(stale, d.now) == []
    assert d.sag.round == 0 and d.sag.history == []


def test_round_close_is_sent_again_while_no_aggregate_comes() -> None:
    d = Driver(spec(min_clients=1, wait=0.0))
    d.load()
    (close,) = d.verdict("a")
    d.at(ROUND_CLOSE_RESEND_S)
    assert d.tick() == []
    d.at(ROUND_CLOSE_RESEND_S + 0.1)
    assert d.tick() == [close]
    d.at(ROUND_CLOSE_RESEND_S + 0.2)
    assert d.tick() == []


# --- waiting for sites -------------------------------------------------------------------------------


def test_a_round_waits_for_min_clients_sites_then_opens() -> None:
    d = Driver(spec(min_clients=2))
    d.alive = {"a"}
    assert d.load() == []
    assert d.sag.phase == Phase.WAITING
    d.at(30)
    assert d.tick() == []
    d.alive = {"a", "b"}
    effects = d.tick()
    assert kinds(effects) == ["OpenRound", "SendTask"]
    assert only(effects, SendTask).sites == ("a", "b")


def test_a_round_fails_after_waiting_schedule_timeout_for_sites() -> None:
    d = Driver(spec(min_clients=2))
    d.alive = {"a"}
    d.load()
    d.at(60)
    assert d.tick() == []
    d.at(60.1)
    e = end(d.tick())
    assert e.status == FAILED
    assert e.reason == "round 0: only 1 site(s) available (a) for 60 s, ScatterAndGather min_clients=2"


# --- persisting: persist_every_n_rounds, commit, save, implied commit --------------------------------


def persisted(n: int, num_rounds: int = 5, start: int = 0) -> list[int]:
    cfg = SAGConfig(num_rounds=num_rounds, start_round=start, persist_every_n_rounds=n)
    return [r for r in range(start, start + num_rounds) if should_persist(cfg, r)]


def test_should_persist_follows_nvflare() -> None:
    assert persisted(1) == [0, 1, 2, 3, 4]
    assert persisted(2) == [1, 3, 4]
    assert persisted(2, num_rounds=4) == [1, 3]
    assert persisted(0) == [4]
    assert persisted(0, num_rounds=1) == [0]
    assert persisted(3, num_rounds=7) == [2, 5, 6]
    assert persisted(0, num_rounds=5, start=3) == [7]
    assert persisted(2, num_rounds=5, start=3) == [3, 5, 7]  # (round + 1) % n on the absolute round
    assert persisted(4, num_rounds=5, start=2) == [3, 6]


def run_rounds(d: Driver, n: int, step: float = 2 * COMMIT_EVERY_S) -> list[list[Effect]]:
    """Aggregate n rounds, step seconds apart; the effects of each aggregate."""
    out = []
    for _ in range(n):
        d.at(d.now - T0 + step)
        out.append(d.aggregate())
    return out


@pytest.mark.parametrize(("n", "saved"), [(1, [0, 1, 2, 3]), (2, [1, 3]), (3, [2, 3]), (0, [3])])
def test_persist_every_n_rounds_decides_which_rounds_are_saved(n: int, saved: list[int]) -> None:
    d = Driver(spec(num_rounds=4, persist_n=n))
    opened = [only(d.load(), OpenRound).message]
    rounds = run_rounds(d, 4)
    opened += [only(effects, OpenRound).message for effects in rounds[:-1]]
    assert [o.round for o in opened if o.persist] == saved  # the aggregate goes to the persistor too
    commits = [e.message.round for effects in rounds for e in effects if isinstance(e, Persist)]
    assert commits == saved


def test_a_small_commit_goes_before_the_next_task_and_the_final_one_waits_for_model_saved() -> None:
    d = Driver()
    d.load()
    r0, _, r2 = run_rounds(d, 3)
    assert kinds(r0) == ["ModelCommit", "OpenRound", "SendTask"]
    commit = r0[0]
    assert isinstance(commit, Persist) and isinstance(commit.message, ModelCommit)
    assert commit.message.round == 0 and not commit.message.final
    assert [h["round"] for h in commit.message.history] == [0]  # the round records not sent yet
    assert kinds(r2) == ["ModelCommit"]
    final = r2[0]
    assert isinstance(final, Persist) and final.message.final and final.message.round == 2
    assert d.sag.phase == Phase.SAVING
    assert d.sag.on_saved(ModelSaved(JOB, 1, "p"), d.now) == []  # an earlier round's confirmation
    assert d.sag.on_saved(ModelSaved(JOB, 2, "p"), d.now) == [EndJob(FINISHED)]
    assert all(h.saved_at == d.now + WALL for h in d.sag.history)


def test_quick_small_rounds_are_committed_by_the_next_rounds_opening() -> None:
    d = Driver(spec(num_rounds=4))
    d.load()
    d.at(0.1)
    r0 = d.aggregate()
    assert kinds(r0) == ["ModelCommit", "OpenRound", "SendTask"]  # the first commit goes
    d.at(0.2)
    task1 = d.sag.task_id
    r1 = d.aggregate()
    assert kinds(r1) == ["OpenRound", "SendTask"]  # less than a second since: implied
    assert only(r1, OpenRound).message.commits == task1
    d.at(0.2 + COMMIT_EVERY_S)
    r2 = d.aggregate()
    assert kinds(r2) == ["ModelCommit", "OpenRound", "SendTask"]  # a second passed: a commit goes
    assert only(r2, OpenRound).message.commits == ""


def test_a_held_implied_commit_goes_before_a_whole_model_save() -> None:
    d = Driver(spec(num_rounds=4), model={"w": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)})
    d.load()
    d.at(0.1)
    d.aggregate()
    d.at(0.2)
    task1 = d.sag.task_id
    d.aggregate()  # implied
    d.at(0.3)
    partial = DXO(WEIGHTS, {"w": np.ones(3, np.float32)})  # not every variable: not the model itself
    effects = d.aggregate(dxo=partial)
    assert kinds(effects) == ["ModelCommit", "OpenRound", "SendTask", "ModelSave"]  # save after the next task
    held = effects[0]
    assert isinstance(held, Persist) and isinstance(held.message, ModelCommit)
    assert (held.message.round, held.message.task_id) == (1, task1)
    save = effects[-1]
    assert isinstance(save, Persist) and isinstance(save.message, ModelSave) and save.message.round == 2
    np.testing.assert_array_equal(save.message.dxo.data["w"], np.ones(3, np.float32))
    np.testing.assert_array_equal(save.message.dxo.data["b"], np.full(2, 2.0, np.float32))  # kept from round 1


def test_weight_diff_rounds_send_the_model_whole_in_model_save() -> None:
    d = Driver(spec(kind=WEIGHT_DIFF))
    opening = only(d.load(), OpenRound).message
    assert not opening.persist and not opening.forward
    effects = d.aggregate(dxo=DXO(WEIGHT_DIFF, {"w": np.ones((3, 3), np.float32)}))
    assert kinds(effects) == ["OpenRound", "SendTask", "ModelSave"]


def test_no_persistor_means_no_save_and_no_wait() -> None:
    d = Driver(spec(num_rounds=1, persistor=False))
    assert not only(d.load(), OpenRound).message.persist
    assert d.aggregate() == [EndJob(FINISHED)]


def test_an_aborted_job_commits_the_held_round_before_its_end_event() -> None:
    d = Driver(spec(num_rounds=5))
    d.load()
    d.at(0.1)
    d.aggregate()
    d.at(0.2)
    task1 = d.sag.task_id
    d.aggregate()  # round 1 held, implied
    effects = d.sag.abort("aborted by the admin", d.now)
    assert kinds(effects) == ["ControlSites", "ModelCommit", "EndJob"]
    commit = effects[1]
    assert isinstance(commit, Persist) and (commit.message.round, commit.message.task_id) == (1, task1)
    assert effects[-1] == EndJob(ABORTED, "aborted by the admin", ordered=True)  # behind the commit
    assert d.sag.history[-1].round == 2 and d.sag.history[-1].close_reason == "job aborted"
    assert d.sag.abort("again", d.now) == []


# --- forwarded models ------------------------------------------------------------------------------


def test_a_large_model_goes_to_the_contributors_with_the_aggregate() -> None:
    d = Driver(spec(min_clients=2), model=LARGE)
    opening = only(d.load(), OpenRound).message
    assert opening.forward and opening.persist
    task0 = d.sag.task_id
    d.at(0.1)
    effects = d.aggregate(accepted=("a", "b"))
    assert kinds(effects) == ["ModelCommit", "OpenRound", "SendTask", "SendTask"]  # large: never implied
    by_ref, whole = (e for e in effects if isinstance(e, SendTask))
    assert by_ref.sites == ("a", "b") and by_ref.task.model_from == task0 and by_ref.task.dxo.data == {}
    assert whole.sites == ("c",) and whole.task.model_from == "" and whole.task.dxo.data["w"].shape == (300_000,)
    assert by_ref.task.task_id == whole.task.task_id == d.sag.task_id
    effects = d.aggregate()
    assert not only(effects, Persist).message.final  # round 1 of 3
    assert not only(effects, OpenRound).message.forward  # the last round's aggregate goes nowhere else


def test_a_small_model_is_not_forwarded() -> None:
    d = Driver()
    assert not only(d.load(), OpenRound).message.forward


def test_a_site_missing_the_forwarded_model_gets_the_whole_task_at_most_every_few_seconds() -> None:
    d = Driver(model=LARGE)
    d.load()
    d.aggregate()
    task1 = d.sag.task_id
    (send,) = d.sag.on_missing_model("a", task1, d.now)
    assert isinstance(send, SendTask) and send.sites == ("a",) and send.task.model_from == ""
    assert d.sag.on_missing_model("a", task1, d.now + 3.9) == []  # on its way
    assert len(d.sag.on_missing_model("a", task1, d.now + 4.0)) == 1
    assert d.sag.on_missing_model("a", "another-task", d.now + 10) == []
    assert d.sag.on_missing_model("x", task1, d.now + 10) == []  # not a target


# --- a site that comes back idle -------------------------------------------------------------------

GRACE = 3 * HEARTBEAT_S  # a target that came back idle gets its task again after three heartbeats


def with_sites_heard_before_the_round(s: JobSpec, sites: tuple[str, ...] = SITES) -> Driver:
    d = Driver(s, sites=sites)
    d.at(-5)
    for site in sites:
        d.beat(site, hello=True)
    d.at(0)
    d.load()
    return d


def test_the_grace_for_a_target_that_came_back_is_three_heartbeats() -> None:
    d = Driver()
    assert d.sag.idle_grace_s == GRACE == 6.0  # not client_timeout_s: a site back at once is never silent


def test_a_target_that_came_back_idle_gets_the_whole_task_once() -> None:
    d = with_sites_heard_before_the_round(spec(min_clients=3))
    d.at(1)
    d.beat("a", 0)  # busy with this round
    d.beat("b", hello=True)  # restarted: its task went with the old process
    assert d.tick() == []
    d.at(1 + GRACE - 0.1)
    d.beat("a", 0)
    d.beat("b")
    assert d.tick() == []  # a task still in its queue would have reached it by now
    d.at(1 + GRACE)
    (send,) = d.tick()
    assert isinstance(send, SendTask) and send.sites == ("b",) and send.task.task_id == d.sag.task_id
    assert send.task.model_from == ""
    np.testing.assert_array_equal(send.task.dxo.data["w"], SMALL["w"])
    d.at(100)
    d.beat("b")
    assert d.tick() == []  # once a round; then the round's usual rules apply


def test_a_site_killed_mid_round_and_back_within_the_client_timeout_finishes_the_round() -> None:
    # issue 11, failure 1: hello-numpy-sag, 2 sites, min_clients 2, a long train_timeout; site a is killed
    # while it trains and is back a second later, heartbeating idle: it never goes silent
    d = with_sites_heard_before_the_round(spec(min_clients=2, num_rounds=4, train_timeout=6000.0), ("a", "b"))
    d.at(1)
    d.beat("a", 0)
    d.beat("b", 0)
    assert d.tick() == []
    d.at(2)
    assert d.verdict("b") == []
    back = 5.5  # killed at 4.5, back at 5.5
    for t in (back, back + HEARTBEAT_S, back + 2 * HEARTBEAT_S, back + GRACE - 0.1):
        d.at(t)
        d.beat("a", hello=t == back)
        assert d.tick() == []
    d.at(back + GRACE)  # three heartbeats after its return
    d.beat("a")
    (send,) = d.tick()
    assert isinstance(send, SendTask) and send.sites == ("a",) and send.task.round == 0
    d.at(back + GRACE + 2)
    d.beat("a", 0)
    assert d.tick() == []
    assert d.verdict("a") == []  # every target answered: the aggregator closes the round
    effects = d.aggregate(accepted=("a", "b"))
    assert d.sag.round == 1 and only(effects, OpenRound).message.targets == ["a", "b"]
    assert d.sag.history[0].aggregated == ["a", "b"]


def test_a_target_that_kept_its_process_still_has_the_task() -> None:
    # idle in its heartbeats while a large task is still on its way: sending it again would double it
    d = with_sites_heard_before_the_round(spec(min_clients=3))
    for dt in (1.0, 30.0, 300.0):
        d.at(dt)
        d.beat("a")
        assert d.tick() == []


def test_a_target_that_came_back_and_found_the_task_in_its_queue_gets_nothing_again() -> None:
    d = with_sites_heard_before_the_round(spec(min_clients=3))
    d.at(1)
    d.beat("b", hello=True)  # its old process never fetched the task: the queue gives it to the new one
    assert d.tick() == []
    for dt in (1 + HEARTBEAT_S, 10.0, 60.0):
        d.at(dt)
        d.beat("b", 0)
        assert d.tick() == []


def test_busy_or_answered_targets_get_nothing_again() -> None:
    d = with_sites_heard_before_the_round(spec(min_clients=3))
    d.at(1)
    d.beat("a", hello=True)
    d.verdict("a")  # answered before it restarted
    d.beat("b", 0, hello=True)  # restarted, and its queue gave it the task again
    for dt in (2.0, 30.0, 60.0):
        d.at(dt)
        d.beat("a")
        d.beat("b", 0)
        assert d.tick() == []


def test_a_site_busy_again_restarts_the_idle_clock() -> None:
    d = with_sites_heard_before_the_round(spec(min_clients=3))
    d.at(1)
    d.beat("b", hello=True)
    d.tick()
    d.at(1 + GRACE - 1)
    d.beat("b", 0)
    d.tick()
    d.at(12)
    d.beat("b")
    assert d.tick() == []  # idle since 12, not since 1
    d.at(12 + GRACE - 0.1)
    assert d.tick() == []
    d.at(12 + GRACE)
    assert kinds(d.tick()) == ["SendTask"]


def test_a_site_that_came_back_is_sent_the_task_again_in_a_later_round_too() -> None:
    d = with_sites_heard_before_the_round(spec(min_clients=3))
    d.at(1)
    d.beat("b", hello=True)
    d.tick()
    d.at(1 + GRACE)
    assert kinds(d.tick()) == ["SendTask"]
    d.at(12)
    d.aggregate()
    d.at(13)
    assert d.tick() == []  # its restart was before this round's task
    d.beat("b", hello=True)
    d.tick()
    d.at(13 + GRACE)
    assert kinds(d.tick()) == ["SendTask"]


# --- the persistor's answers that do not come ----------------------------------------------------------


def test_a_final_save_that_does_not_come_is_sent_again_whole_then_fails_the_job() -> None:
    d = Driver(spec(num_rounds=1))
    d.load()
    (commit,) = d.aggregate()
    assert isinstance(commit, Persist) and isinstance(commit.message, ModelCommit) and commit.message.final
    d.at(PERSISTOR_RETRY_S - 0.1)
    assert d.tick() == []
    d.at(PERSISTOR_RETRY_S)
    (again,) = d.tick()
    assert isinstance(again, Persist) and isinstance(again.message, ModelSave)
    assert again.message.final and again.message.round == 0
    assert again.message.history == commit.message.history
    np.testing.assert_array_equal(again.message.dxo.data["w"], SMALL["w"] + 1)
    d.at(PERSISTOR_RETRY_S + 1)
    assert d.tick() == []  # once
    d.at(PERSISTOR_TIMEOUT_S)
    e = end(d.tick())
    assert e.status == FAILED
    assert "round 0: the persistor did not confirm the final model within 600 s" in e.reason


def test_a_final_save_confirmed_after_the_resend_finishes_the_job() -> None:
    d = Driver(spec(num_rounds=1))
    d.load()
    d.aggregate()
    d.at(PERSISTOR_RETRY_S)
    d.tick()
    assert d.sag.on_saved(ModelSaved(JOB, 0, "p"), d.now) == [EndJob(FINISHED)]


def test_a_final_save_that_cannot_be_sent_fails_the_job() -> None:
    d = Driver(spec(num_rounds=1))
    d.load()
    d.aggregate()
    assert d.sag.on_persist_failed(5, "nope", d.now) == []  # not this round
    e = end(d.sag.on_persist_failed(0, "unroutable", d.now))
    assert e == EndJob(FAILED, "round 0: the final model could not be sent to the persistor: unroutable")


def test_a_model_load_that_gets_no_answer_is_sent_again_then_fails_the_job() -> None:
    d = Driver()
    (load,) = d.start()
    d.at(PERSISTOR_RETRY_S)
    assert d.tick() == [load]
    d.at(PERSISTOR_RETRY_S + 10)
    assert d.tick() == []
    d.at(PERSISTOR_TIMEOUT_S)
    e = end(d.tick())
    assert e.status == FAILED and "the persistor sent no model within 600 s" in e.reason


# --- reconnect ---------------------------------------------------------------------------------------


def test_reconnect_sends_the_open_round_to_the_aggregator_again() -> None:
    d = Driver(spec(min_clients=1, wait=0.0))
    opening = only(d.load(), OpenRound)
    assert d.sag.on_reconnect(d.now) == [opening]
    (close,) = d.verdict("a")
    assert d.sag.on_reconnect(d.now) == [opening, close]
    d.aggregate(accepted=("a",))


def test_reconnect_while_loading_sends_nothing() -> None:
    d = Driver()
    d.start()
    assert d.sag.on_reconnect(d.now) == []


# --- round records -----------------------------------------------------------------------------------


def test_a_finished_rounds_record_has_todays_keys() -> None:
    d = Driver(spec(min_clients=2, num_rounds=1))
    d.load()
    d.verdict("c", accepted=False, reason="late")
    d.aggregate(accepted=("a", "b"))
    assert d.sag.on_saved(ModelSaved(JOB, 0, "p"), d.now) == [EndJob(FINISHED)]
    (rec,) = d.sag.history_dicts()
    assert set(rec) == {"round", "task_id", "targets", "accepted", "rejected", "started_at", "close_reason",
                        "aggregated", "closed_at", "seconds", "done_at", "saved_at"}
    assert rec["rejected"] == [{"site": "c", "rc": RC_OK, "reason": "late"}]


def test_an_open_rounds_record_has_only_what_is_known() -> None:
    d = Driver()
    d.load()
    assert d.sag.record is not None
    assert list(d.sag.record.to_dict()) == ["round", "task_id", "targets", "accepted", "rejected", "started_at"]


def test_round_record_round_trips_through_its_dict_and_keeps_unknown_keys() -> None:
    d = {"round": 3, "task_id": "t", "targets": ["a", "b"], "accepted": ["a"],
         "rejected": [{"site": "b", "rc": "EXECUTION_EXCEPTION", "reason": "boom"}], "started_at": 1.5,
         "close_reason": "all 2 targets answered", "aggregated": ["a"], "closed_at": 2.5, "seconds": 1.0,
         "done_at": 2.6, "saved_at": 3.0, "future_key": {"x": 1}}
    rec = RoundRecord.from_dict(d)
    assert rec.rejected == [Rejection("b", "EXECUTION_EXCEPTION", "boom")]
    assert rec.to_dict() == d
    assert RoundRecord.from_dict(rec.to_dict()) == rec


def test_phase_values_are_what_status_shows() -> None:
    assert [p.value for p in Phase] == ["loading", "waiting", "training", "aggregating", "saving", "done"]
    assert str(Phase.TRAINING) == "training" and f"{Phase.SAVING}" == "saving"


# --- history_dicts: made again only for records that changed ---------------------------------------


def test_history_dicts_stay_equal_to_a_fresh_rebuild_through_a_job_with_saves_and_a_resume() -> None:
    d = Driver(spec(num_rounds=6, persist_n=2))
    d.load()

    def fresh() -> list[dict[str, Any]]:
        return [h.to_dict() for h in d.sag.history]

    assert d.sag.history_dicts() == fresh() == []
    for r in range(4):
        d.at(10.0 * r + 1)
        for site in SITES:
            d.verdict(site)
        d.aggregate()
        assert d.sag.history_dicts() == fresh()
    # a confirmation of round 3 marks rounds 0..3 saved, the older ones too
    d.sag.on_saved(ModelSaved(JOB, 3, "p"), d.at(45.0))
    assert d.sag.history_dicts() == fresh()
    assert all(h.get("saved_at") == T0 + 45.0 + WALL for h in d.sag.history_dicts()[:4])
    first = d.sag.history_dicts()
    assert first is not d.sag.history_dicts()  # a new list each time; a caller may keep it
    # a resume replaces the history: nothing cached of the old one survives
    d2 = Driver(spec(num_rounds=6))
    d2.sag.history_dicts()
    d2.load(source="saved", next_round=2, history=[{"round": 0, "task_id": "t0", "targets": ["a"],
                                                    "accepted": ["a"], "rejected": [], "started_at": 1.0},
                                                   {"round": 1, "task_id": "t1", "targets": ["a"],
                                                    "accepted": ["a"], "rejected": [], "started_at": 2.0}])
    assert [h["round"] for h in d2.sag.history_dicts()] == [0, 1]
    assert d2.sag.history_dicts() == [h.to_dict() for h in d2.sag.history]
