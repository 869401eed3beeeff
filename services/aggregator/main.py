"""The aggregator service: one accumulator per open round, fed from the results queue."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from services.aggregator.accumulator import Accumulator, VarSpec
from services.wire.bus import Bus, Delivery
from services.wire.errors import Rejected
from services.wire.jobspec import AggregatorConfig
from services.wire.lifecycle import install_stop_signals
from services.wire.logs import setup_logging
from services.wire.messages import (
    ABORTED,
    FAILED,
    FINISHED,
    Contribution,
    Control,
    JobEvent,
    RoundAggregated,
    RoundClose,
    RoundOpen,
    TaskResult,
    decode,
)
from services.wire.settings import Settings, load_settings
from services.wire.topology import RK_CONTRIBUTION, RK_ROUND_AGGREGATED, service_topology

log = logging.getLogger(__name__)


@dataclass(slots=True)
class OpenRound:
    """A round being accumulated."""

    job_id: str
    round: int
    acc: Accumulator


class AggregatorService:
    """Accepts or rejects each result with a reason and publishes each round's aggregate."""

    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.s = settings
        self.bus = bus
        self.stop = threading.Event()
        self.open: dict[str, OpenRound] = {}  # job_id -> its open round
        self.closed: dict[str, int] = {}  # job_id -> last closed round
        self.ended: set[str] = set()  # jobs that finished, failed or were aborted

    def start(self) -> None:
        """Consume the control queue and the results queue."""
        n = self.bus.names
        self.bus.consume(n.aggregator_queue, self.on_control, prefetch=16)
        self.bus.consume(n.results_queue, self.on_result, prefetch=4)

    def run(self) -> None:
        """Serve until stopped."""
        self.start()
        log.info("aggregator ready")
        self.bus.run(self.stop)

    def on_control(self, d: Delivery) -> None:
        """round.open, round.close, job events, control."""
        limit = self.s.max_body_bytes
        if d.msg_type == RoundOpen.TYPE:
            self.open_round(decode(RoundOpen, d.body, limit))
        elif d.msg_type == RoundClose.TYPE:
            self.close_round(decode(RoundClose, d.body, limit))
        elif d.msg_type == JobEvent.TYPE:
            ev = decode(JobEvent, d.body, limit)
            if ev.status in (FINISHED, FAILED, ABORTED):
                self.ended.add(ev.job_id)
                if self.open.pop(ev.job_id, None) is not None:
                    log.info("job %s %s: open round dropped", ev.job_id, ev.status)
        elif d.msg_type == Control.TYPE:
            c = decode(Control, d.body, limit)
            if c.command == "shutdown":
                log.info("shutdown requested")
                self.stop.set()
        else:
            raise Rejected(f"the aggregator queue does not take {d.msg_type!r} messages")

    def open_round(self, m: RoundOpen) -> None:
        """Start accumulating a round (a re-sent round.open for the same round is a no-op)."""
        cur = self.open.get(m.job_id)
        if cur is not None and cur.round == m.round:
            return
        spec = {k: VarSpec(m.var_dtypes[k], tuple(m.var_shapes[k])) for k in m.var_dtypes if k in m.var_shapes}
        cfg = AggregatorConfig(m.expected_data_kind, dict(m.aggregation_weights), m.exclude_vars, m.weigh_by_local_iter)
        self.open[m.job_id] = OpenRound(m.job_id, m.round, Accumulator(cfg, frozenset(m.targets), spec))
        self.ended.discard(m.job_id)
        log.info("round %d of job %s open for %s", m.round, m.job_id, ", ".join(m.targets))

    def close_round(self, m: RoundClose) -> None:
        """Publish the aggregate of a round and forget it."""
        cur = self.open.get(m.job_id)
        if cur is None or cur.round != m.round:
            if self.closed.get(m.job_id) == m.round:
                return  # already closed: a redelivered round.close
            raise Rejected(f"round.close for round {m.round} of job {m.job_id}, which is not open")
        dxo = cur.acc.result()
        agg = RoundAggregated(m.job_id, m.round, list(cur.acc.accepted), dxo)
        log.info("aggregating %d update(s) at round %d of job %s (%s)", len(cur.acc.accepted), m.round, m.job_id,
                 m.reason)
        self.bus.publish(self.bus.names.events, RK_ROUND_AGGREGATED, agg,
                         headers={"job_id": m.job_id, "round": m.round})
        del self.open[m.job_id]
        self.closed[m.job_id] = m.round

    def on_result(self, d: Delivery) -> None:
        """Check a result's sender and round, then accept or reject it (with an event)."""
        if d.msg_type != TaskResult.TYPE:
            raise Rejected(f"the results queue takes result messages, not {d.msg_type!r}")
        if not d.user_id:
            raise Rejected("result without a user_id property: the sender is unknown")
        r = decode(TaskResult, d.body, self.s.max_body_bytes)
        if d.header_str("site") and d.header_str("site") != r.site:
            raise Rejected(f"header site {d.header_str('site')!r} does not match body site {r.site!r}")
        cur = self.open.get(r.job_id)
        try:
            if cur is None:
                if r.job_id in self.ended or r.job_id in self.closed:
                    raise Rejected(f"stale: job {r.job_id} has no open round (result for round {r.round})")
                raise Rejected(f"unknown job {r.job_id!r}")
            if r.round != cur.round:
                raise Rejected(f"stale or wrong round: result for round {r.round}, round {cur.round} is open")
            cur.acc.accept(r.site, r.rc, r.dxo, r.error)
        except Rejected as e:
            self._verdict(r, False, e.reason)
            raise
        self._verdict(r, True, "")
        log.info("contribution from %s ACCEPTED at round %d of job %s", r.site, r.round, r.job_id)

    def _verdict(self, r: TaskResult, accepted: bool, reason: str) -> None:
        ev = Contribution(r.job_id, r.round, r.site, accepted, r.rc, reason)
        self.bus.publish(self.bus.names.events, RK_CONTRIBUTION, ev,
                         headers={"job_id": r.job_id, "round": r.round, "site": r.site})


def main(argv: list[str] | None = None) -> int:
    """Entry point of `sagmq aggregator`."""
    settings = load_settings()
    setup_logging(settings.log_level, "aggregator")
    bus = Bus(settings, "aggregator").connect()
    bus.declare(service_topology(settings.prefix))
    svc = AggregatorService(settings, bus)
    install_stop_signals(svc.stop)
    svc.run()
    bus.close()
    return 0
