"""Metrics a site's result reports in its DXO meta reach the server in round.aggregated (whole and
streamed results), only for accepted results; the server's round record keeps them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from sagmq.aggregator.main import AggregatorService
from sagmq.memory import MemoryBroker
from sagmq.wire.codec import DXO, WEIGHTS
from sagmq.wire.messages import RoundAggregated, TaskResult
from sagmq.wire.settings import Settings
from tests.unit.choreography.harness import Probe, running, service_bus
from tests.unit.choreography.test_aggregator import JOB, open_round, send_result


def reporting(site: str, w: np.ndarray, meta: dict[str, object]) -> TaskResult:
    return TaskResult(JOB, 0, "train", "task-0", site, "OK",
                      DXO(WEIGHTS, {"w": w}, {"NUM_STEPS_CURRENT_ROUND": 1, **meta}))


@pytest.mark.parametrize("chunk", [None, 4096], ids=["whole", "streamed"])
def test_reported_metrics_travel_with_the_aggregate(broker: MemoryBroker, settings: Settings,
                                                    chunk: int | None) -> None:
    s = settings if chunk is None else replace(settings, chunk_bytes=chunk)  # 8 kB results: in parts
    p = Probe(broker, s)
    with running(broker, lambda b: AggregatorService(s, b, grace_s=0.5), service_bus(broker, s, "aggregator")):
        x = np.arange(2000, dtype=np.float32)
        open_round(p, (2000,))
        send_result(p, reporting("site-1", x, {"metrics": {"loss": 0.5, "note": "text"}, "initial_metrics": 0.7}))
        send_result(p, reporting("site-2", np.zeros(4, np.float32), {"metrics": {"loss": 9.0}}))  # refused: shape
        agg = p.first(RoundAggregated)
        assert agg.accepted == ["site-1"]
        assert agg.metrics == {"site-1": {"loss": 0.5, "initial_metrics": 0.7}}  # not the refused result's
