"""ScatterAndGather's round rules (RoundMachine) and persistence rule, with a fake clock."""

from __future__ import annotations

import pytest

from sagmq.job.spec import SAGConfig
from sagmq.server.workflow import RoundMachine, should_persist
from sagmq.wire.messages import RC_EXECUTION_EXCEPTION, RC_OK, RC_TASK_ABORTED

T0 = 1000.0


def machine(targets: tuple[str, ...] = ("a", "b", "c"), min_clients: int = 3, wait: float = 10.0,
            train_timeout: float = 0.0, ire: bool | None = None, rnd: int = 0) -> RoundMachine:
    cfg = SAGConfig(min_clients=min_clients, num_rounds=5, wait_time_after_min_received=wait,
                    train_timeout=train_timeout, ignore_result_error=ire)
    return RoundMachine(cfg, rnd, targets, T0)


ALL = {"a", "b", "c", "d", "e"}


# --- closing ------------------------------------------------------------------------------


def test_open_until_all_targets_answered_then_closes() -> None:
    m = machine(min_clients=3)
    assert m.close_reason(T0, ALL) is None
    assert m.on_contribution("a", True, RC_OK, T0 + 1) is None
    assert m.close_reason(T0 + 1, ALL) is None
    m.on_contribution("b", True, RC_OK, T0 + 2)
    assert m.close_reason(T0 + 2, ALL) is None
    m.on_contribution("c", True, RC_OK, T0 + 3)
    reason = m.close_reason(T0 + 3, ALL)
    assert reason is not None and "all 3 targets answered" in reason
    assert m.accepted() == ["a", "b", "c"]


def test_all_answered_closes_even_below_min_clients_default() -> None:
    # NVFlare's default min_clients is 1000: with 2 targets, the round closes when both answered.
    cfg = SAGConfig()
    m = RoundMachine(cfg, 0, ("a", "b"), T0)
    m.on_contribution("a", True, RC_OK, T0)
    assert m.close_reason(T0 + 10**6, {"a", "b"}) is None
    m.on_contribution("b", True, RC_OK, T0)
    assert m.close_reason(T0, {"a", "b"}) is not None


def test_min_clients_reached_waits_for_wait_time_then_closes() -> None:
    m = machine(min_clients=2, wait=10.0)
    m.on_contribution("a", True, RC_OK, T0 + 1)
    assert m.min_reached_at is None
    m.on_contribution("b", True, RC_OK, T0 + 5)
    assert m.min_reached_at == T0 + 5
    assert m.close_reason(T0 + 5, ALL) is None
    assert m.close_reason(T0 + 14.999, ALL) is None
    reason = m.close_reason(T0 + 15, ALL)
    assert reason is not None
    assert "wait" in reason
    assert "2 answered" in reason


def test_wait_time_counts_from_when_min_was_reached_not_from_later_answers() -> None:
    m = machine(targets=("a", "b", "c", "d"), min_clients=2, wait=10.0)
    m.on_contribution("a", True, RC_OK, T0)
    m.on_contribution("b", True, RC_OK, T0 + 2)
    m.on_contribution("c", True, RC_OK, T0 + 9)
    assert m.min_reached_at == T0 + 2
    assert m.close_reason(T0 + 11.9, ALL) is None
    assert m.close_reason(T0 + 12, ALL) is not None


def test_wait_time_zero_closes_as_soon_as_min_reached() -> None:
    m = machine(min_clients=1, wait=0.0)
    m.on_contribution("b", True, RC_OK, T0 + 3)
    reason = m.close_reason(T0 + 3, ALL)
    assert reason is not None and "wait" in reason


def test_rejected_answers_count_towards_min_clients() -> None:
    m = machine(min_clients=2, wait=1.0)
    m.on_contribution("a", False, RC_OK, T0)
    m.on_contribution("b", True, RC_OK, T0)
    assert m.close_reason(T0 + 1, ALL) is not None
    assert m.accepted() == ["b"]


def test_train_timeout_closes_with_whatever_answered() -> None:
    m = machine(min_clients=3, train_timeout=60.0)
    m.on_contribution("a", True, RC_OK, T0 + 5)
    assert m.close_reason(T0 + 59.9, ALL) is None
    reason = m.close_reason(T0 + 60, ALL)
    assert reason is not None
    assert "train_timeout" in reason
    assert "1 answer" in reason
    assert m.accepted() == ["a"]


def test_train_timeout_closes_even_with_no_answer() -> None:
    m = machine(train_timeout=5.0)
    reason = m.close_reason(T0 + 5, ALL)
    assert reason is not None and "train_timeout" in reason


def test_train_timeout_zero_never_closes_by_time() -> None:
    m = machine(min_clients=3, train_timeout=0.0, wait=10.0)
    m.on_contribution("a", True, RC_OK, T0)
    for dt in (0.0, 1.0, 3600.0, 1e9):
        assert m.close_reason(T0 + dt, ALL) is None


def test_closes_when_every_outstanding_target_stopped_heartbeating() -> None:
    m = machine()
    m.on_contribution("a", True, RC_OK, T0)
    assert m.close_reason(T0 + 1, {"a", "b"}) is None  # b is still alive
    assert m.close_reason(T0 + 1, {"a", "c", "x"}) is None  # c is still alive
    reason = m.close_reason(T0 + 1, {"a", "x"})
    assert reason is not None
    assert "b" in reason and "c" in reason and "stopped" in reason


def test_no_answer_and_no_target_alive_closes() -> None:
    m = machine()
    assert m.close_reason(T0, set()) is not None


def test_alive_sites_that_already_answered_do_not_keep_the_round_open() -> None:
    m = machine(targets=("a", "b"), min_clients=2)
    m.on_contribution("a", True, RC_OK, T0)
    assert m.close_reason(T0, {"a"}) is not None


def test_duplicate_answer_is_not_counted_twice() -> None:
    m = machine(min_clients=2, wait=0.0)
    m.on_contribution("a", True, RC_OK, T0)
    assert m.on_contribution("a", True, RC_OK, T0 + 1) is None
    assert m.on_contribution("a", False, RC_EXECUTION_EXCEPTION, T0 + 2) is None
    assert len(m.responded) == 1
    assert m.min_reached_at is None
    assert m.close_reason(T0 + 100, ALL) is None
    assert m.accepted() == ["a"]  # the later duplicate does not overwrite the first verdict


def test_non_target_sites_are_ignored() -> None:
    m = machine(targets=("a", "b"), min_clients=1, wait=0.0, ire=False)
    assert m.on_contribution("x", True, RC_OK, T0) is None
    assert m.on_contribution("y", False, RC_EXECUTION_EXCEPTION, T0) is None  # no fail: not ours
    assert m.responded == {}
    assert m.min_reached_at is None
    assert m.close_reason(T0 + 100, {"a", "b"}) is None
    assert m.accepted() == []


# --- ignore_result_error ------------------------------------------------------------------------


def test_ignore_result_error_true_ignores_errors() -> None:
    m = machine(targets=("a", "b", "c"), min_clients=3, ire=True)
    for s in ("a", "b", "c"):
        assert m.on_contribution(s, False, RC_EXECUTION_EXCEPTION, T0) is None
    assert m.accepted() == []
    assert m.close_reason(T0, ALL) is not None


def test_ignore_result_error_false_fails_on_first_error() -> None:
    m = machine(targets=("a", "b", "c"), min_clients=1, ire=False)
    assert m.on_contribution("a", True, RC_OK, T0) is None
    reason = m.on_contribution("b", False, RC_TASK_ABORTED, T0)
    assert reason is not None
    assert "b" in reason and RC_TASK_ABORTED in reason and "ignore_result_error" in reason


def test_ignore_result_error_none_fails_only_below_min_clients() -> None:
    m = machine(targets=("a", "b", "c", "d", "e"), min_clients=3, ire=None)
    assert m.on_contribution("a", False, RC_EXECUTION_EXCEPTION, T0) is None  # 4 good left
    assert m.on_contribution("b", False, RC_EXECUTION_EXCEPTION, T0) is None  # 3 good left == min: ok
    assert m.on_contribution("c", True, RC_OK, T0) is None
    reason = m.on_contribution("d", False, RC_EXECUTION_EXCEPTION, T0)  # 2 good left < 3
    assert reason is not None
    assert "min_clients" in reason and "(2)" in reason and "(3)" in reason
    assert "a, b, d" in reason


def test_ignore_result_error_none_exact_threshold_is_ok() -> None:
    m = machine(targets=("a", "b", "c", "d", "e"), min_clients=3, ire=None)
    m.on_contribution("a", False, RC_EXECUTION_EXCEPTION, T0)
    assert m.on_contribution("b", False, RC_EXECUTION_EXCEPTION, T0) is None
    assert len(m.targets) - len(m.failed) == m.cfg.min_clients


def test_ignore_result_error_none_ok_results_never_fail() -> None:
    m = machine(targets=("a", "b"), min_clients=2, ire=None)
    assert m.on_contribution("a", False, RC_OK, T0) is None  # rejected by the aggregator, but rc OK
    assert m.failed == set()


@pytest.mark.parametrize("ire", [None, False])
def test_first_error_with_min_equal_to_targets_fails_unless_ignored(ire: bool | None) -> None:
    m = machine(targets=("a", "b"), min_clients=2, ire=ire)
    assert m.on_contribution("a", False, RC_EXECUTION_EXCEPTION, T0) is not None


# --- should_persist -----------------------------------------------------------------------------


def persisted(n: int, num_rounds: int = 5, start: int = 0) -> list[int]:
    cfg = SAGConfig(num_rounds=num_rounds, start_round=start, persist_every_n_rounds=n)
    return [r for r in range(start, start + num_rounds) if should_persist(cfg, r)]


def test_persist_every_round_when_n_is_1() -> None:
    assert persisted(1) == [0, 1, 2, 3, 4]


def test_persist_every_second_round_and_the_last() -> None:
    assert persisted(2) == [1, 3, 4]
    assert persisted(2, num_rounds=4) == [1, 3]


def test_persist_only_last_round_when_n_is_0() -> None:
    assert persisted(0) == [4]
    assert persisted(0, num_rounds=1) == [0]


def test_persist_every_third_round() -> None:
    assert persisted(3, num_rounds=7) == [2, 5, 6]


def test_persist_with_start_round_offset() -> None:
    # rounds 3..7; NVFlare counts (round + 1) % n on the absolute round number
    assert persisted(0, num_rounds=5, start=3) == [7]
    assert persisted(1, num_rounds=5, start=3) == [3, 4, 5, 6, 7]
    assert persisted(2, num_rounds=5, start=3) == [3, 5, 7]
    assert persisted(4, num_rounds=5, start=2) == [3, 6]
