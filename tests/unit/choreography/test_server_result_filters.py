"""The server's task_result_filters, run by the aggregator on each result before it is accumulated."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from sagmq.aggregator.main import AggregatorService
from sagmq.memory import MemoryBroker
from sagmq.wire.codec import DXO, WEIGHT_DIFF
from sagmq.wire.messages import Contribution, RoundAggregated, RoundOpen, TaskResult
from sagmq.wire.settings import Settings
from sagmq.wire.topology import RK_RESULT, RK_ROUND_OPEN
from tests.unit.choreography.harness import Probe, running, service_bus

JOB = "f" * 32
SITES = ["site-1", "site-2"]


def open_round(p: Probe, filters: list[dict[str, Any]], n: int = 4) -> None:
    m = RoundOpen(JOB, 0, "task-0", SITES, WEIGHT_DIFF, {}, {"w": "<f8", "secret": "<f8"},
                  {"w": [n], "secret": [n]}, result_filters=filters)
    p.bus.publish(p.names.events, RK_ROUND_OPEN, m, headers={"job_id": JOB, "round": 0})


def send(p: Probe, site: str, data: dict[str, np.ndarray]) -> None:
    r = TaskResult(JOB, 0, "train", "task-0", site, "OK", DXO(WEIGHT_DIFF, data, {"NUM_STEPS_CURRENT_ROUND": 1}))
    p.bus.publish(p.names.results, RK_RESULT, r, headers={"job_id": JOB, "round": 0, "site": site})


def test_exclude_vars_and_percentile_privacy_run_before_accumulation(broker: MemoryBroker, settings: Settings) -> None:
    p = Probe(broker, settings)
    with running(broker, lambda b: AggregatorService(settings, b, grace_s=0.5), service_bus(broker, settings, "a")):
        open_round(p, [{"tasks": ["train"], "path": "ExcludeVars", "args": {"exclude_vars": ["secret"]}},
                       {"tasks": ["*"], "path": "PercentilePrivacy", "args": {"percentile": 50, "gamma": 0.5}}])
        send(p, "site-1", {"w": np.array([0.1, -0.2, 0.9, -1.0]), "secret": np.ones(4)})
        send(p, "site-2", {"w": np.array([0.3, 0.0, -0.05, 2.0]), "secret": np.ones(4)})
        agg = p.first(RoundAggregated)
    assert agg.dxo is not None and list(agg.dxo.data) == ["w"]  # the excluded variable never reached the sums
    # per site: |w| below its median zeroed, the rest clipped to 0.5; then the mean
    np.testing.assert_allclose(agg.dxo.data["w"], [(0 + 0.3) / 2, (0 + 0) / 2, (0.5 + 0) / 2, (-0.5 + 0.5) / 2])


def test_a_streamed_result_gets_exclude_vars_on_its_header(broker: MemoryBroker, settings: Settings) -> None:
    small = replace(settings, chunk_bytes=4096)
    p = Probe(broker, small)
    with running(broker, lambda b: AggregatorService(small, b, grace_s=0.5), service_bus(broker, small, "a")):
        open_round(p, [{"tasks": ["train"], "path": "ExcludeVars", "args": {"exclude_vars": "^sec"}}], n=1000)
        send(p, "site-1", {"w": np.full(1000, 1.0), "secret": np.full(1000, 7.0)})
        send(p, "site-2", {"w": np.full(1000, 3.0), "secret": np.full(1000, 7.0)})
        agg = p.first(RoundAggregated)
    assert agg.dxo is not None and list(agg.dxo.data) == ["w"]
    np.testing.assert_array_equal(agg.dxo.data["w"], np.full(1000, 2.0))


def test_a_streamed_result_is_refused_by_a_filter_that_needs_it_whole(broker: MemoryBroker,
                                                                        settings: Settings) -> None:
    small = replace(settings, chunk_bytes=4096)
    p = Probe(broker, small)
    with running(broker, lambda b: AggregatorService(small, b, grace_s=0.5), service_bus(broker, small, "a")):
        open_round(p, [{"tasks": ["train"], "path": "SVTPrivacy", "args": {}}], n=1000)
        send(p, "site-1", {"w": np.full(1000, 1.0), "secret": np.full(1000, 7.0)})
        verdict = p.first(Contribution, lambda c: c.site == "site-1")
    assert not verdict.accepted and "need the whole result" in verdict.reason


def test_a_round_whose_filters_cannot_be_built_refuses_every_result(broker: MemoryBroker, settings: Settings) -> None:
    p = Probe(broker, settings)
    with running(broker, lambda b: AggregatorService(settings, b, grace_s=0.5), service_bus(broker, settings, "a")):
        open_round(p, [{"tasks": ["train"], "path": "my_custom.Filter", "args": {}}])
        send(p, "site-1", {"w": np.ones(4), "secret": np.ones(4)})
        verdict = p.first(Contribution, lambda c: c.site == "site-1")
    assert not verdict.accepted and "task_result_filters cannot run" in verdict.reason
