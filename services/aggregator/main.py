"""The aggregator service: hosts one InTimeAccumulateWeightedAggregator per open round.

The component does the arithmetic and the checks, and takes a large result part by part;
this service is the adapter around it: it feeds it the results queue, turns its verdicts
into contribution events and dead-letters, and publishes each round's aggregate.

Nothing a round depends on is acked before the round's aggregate is confirmed by the
broker: the round.open, every accepted result and the round.close stay unacked until
then. If the aggregator dies (or loses its connection) the broker redelivers them and a
new aggregator rebuilds the open round exactly; a result that arrives before its
round.open is held for a grace period instead of being refused.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace

from sagmq.aggregator.collection import CollectionAggregator
from sagmq.aggregator.intime_accumulate_weighted_aggregator import (
    InTimeAccumulateWeightedAggregator,
    StreamHeader,
    VarSpec,
    read_stream_header,
)
from sagmq.filters.base import RC_TASK_RESULT_FILTER_ERROR, TASK_RESULT, FilterContext, FilterError
from sagmq.filters.chain import FilterChain
from sagmq.filters.sides import only_excludes, result_chain_from_wire
from sagmq.job.collection_spec import KeySettings
from sagmq.runtime.lifecycle import serve
from sagmq.wire.blob import is_part, part_info
from sagmq.wire.bus import Bus, Delivery
from sagmq.wire.codec import DXO, unpack
from sagmq.wire.errors import DecodeError, Rejected, SagmqError
from sagmq.wire.messages import (
    ABORTED,
    FAILED,
    FINISHED,
    RC_OK,
    Contribution,
    Control,
    JobEvent,
    RoundAggregated,
    RoundClose,
    RoundOpen,
    TaskResult,
    from_wire,
    reported_metrics,
)
from sagmq.wire.settings import Settings
from sagmq.wire.topology import RK_CONTRIBUTION, RK_ROUND_AGGREGATED, RK_ROUND_AGGREGATED_SAVE, rk_aggregate

log = logging.getLogger(__name__)


@dataclass(slots=True)
class OpenRound:
    """A round being accumulated, and the deliveries held until its aggregate is confirmed."""

    job_id: str
    round: int
    task_id: str
    aggregator: InTimeAccumulateWeightedAggregator
    held: list[Delivery] = field(default_factory=list)
    closing: RoundClose | None = None
    closing_since: float = 0.0
    streams: dict[str, Stream] = field(default_factory=dict)  # blob -> a large result the aggregator takes in
    answered: set[str] = field(default_factory=set)  # targets whose result was accepted or refused
    persist: bool = False  # the aggregate goes to the persistor too
    forward: bool = False  # the aggregate goes to the accepted sites too (their next model)
    commits: str = ""  # passed on with the aggregate (see RoundOpen.commits)
    filters: FilterChain = field(default_factory=lambda: FilterChain({}))  # the server's task_result_filters
    filters_broken: str = ""  # why the round's filters could not be built: every result is refused
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> its accepted result's (meta)

    def all_answered(self) -> bool:
        return self.answered >= self.aggregator.targets


def _aggregator(m: RoundOpen, spec: dict[str, VarSpec]) -> InTimeAccumulateWeightedAggregator:
    """The round's aggregator: one kind, or NVFlare's collection mode (an accumulator per key)."""
    if not m.collection_kinds:
        return InTimeAccumulateWeightedAggregator(m.expected_data_kind, m.aggregation_weights, m.exclude_vars,
                                                  m.weigh_by_local_iter, targets=m.targets, spec=spec)
    keys = {k: KeySettings(kind, m.collection_weights.get(k, {}), m.collection_exclude_vars.get(k, ""))
            for k, kind in m.collection_kinds.items()}
    return CollectionAggregator(keys, m.weigh_by_local_iter, targets=m.targets, spec=spec)


@dataclass(slots=True)
class Stream:
    """A large result arriving part by part: what the service keeps of it (the sums are the component's)."""

    blob: str
    result: TaskResult  # without its dxo
    parts: int
    held: list[Delivery] = field(default_factory=list)


@dataclass(slots=True)
class Early:
    """A result that arrived before its round.open (after a restart), held for a while."""

    delivery: Delivery
    result: TaskResult
    since: float


RETRY_S = 5.0  # a refused aggregate is sent again after this long


class AggregatorService:
    """Accepts or rejects each result with a reason and publishes each round's aggregate."""

    def __init__(self, settings: Settings, bus: Bus, grace_s: float = 10.0) -> None:
        self.s = settings
        self.bus = bus
        self.grace_s = grace_s
        self.stop = threading.Event()
        self.open: dict[str, OpenRound] = {}  # job_id -> its open round
        self.closed: dict[str, int] = {}  # job_id -> last closed round
        self.ended: set[str] = set()  # jobs that finished, failed or were aborted
        self.early: list[Early] = []
        self.refused: dict[str, float] = {}  # blobs already turned away: their remaining parts are dropped
        self.pending: dict[str, float] = {}  # blobs whose round.open has not come yet: since when
        self.retries: list[tuple[float, str, RoundAggregated, list[Delivery], list[str]]] = []  # refused aggregates
        self.refused_aggregates = 0
        self.accepted_verdicts: list[TaskResult] = []  # published at the next tick if their round is still open
        bus.on_reconnect.append(self.forget_unacked)

    def start(self) -> None:
        """Consume the control queue and the results queue, each with a bounded prefetch (prefetch 0 let a
        flood of junk pull the whole backlog into memory)."""
        n = self.bus.names
        # held per round until its aggregate is confirmed: its round.open and round.close, for the round
        # open and one whose aggregate waits for a retry
        self.bus.consume(n.aggregator_queue, self.on_control, prefetch=64)
        # held per round: every accepted result (one delivery, or its parts, bodies dropped once added) and
        # the early ones. The window fits 16 results of the largest size (SAGMQ_MAX_MODEL_BYTES /
        # SAGMQ_CHUNK_BYTES parts each) and 1024 small ones; a round that needs more closes by the round's
        # rules (min_clients and its wait, or train_timeout) with the results that got in. Junk is acked as it
        # is handled.
        self.bus.consume(n.results_queue, self.on_result, prefetch=self.s.prefetch_for(blobs=16, slack=1024),
                         stream=True)

    def run(self) -> None:
        """Serve until stopped."""
        self.start()
        log.info("aggregator ready")
        self.bus.run(self.stop, self.tick, 0.1)

    def forget_unacked(self) -> None:
        """After a reconnect every held delivery is redelivered: rebuild from those."""
        if self.open or self.early:
            log.warning("connection replaced: rebuilding %d open round(s) from redelivered messages", len(self.open))
        self.open.clear()
        self.early.clear()
        self.retries.clear()
        self.accepted_verdicts.clear()

    def tick(self) -> None:
        """Finish closes that waited for redelivered results; refuse early results past the grace."""
        now = time.monotonic()
        self._flush_verdicts()
        due = [r for r in self.retries if r[0] <= now]
        self.retries = [r for r in self.retries if r[0] > now]
        for _, rk, agg, held, cc in due:
            self._send_aggregate(rk, agg, held, cc)
        for cur in list(self.open.values()):
            for blob, reason in cur.aggregator.stale_streams(now, self.s.chunk_timeout_s).items():
                self._refuse_stream(cur, cur.streams[blob], reason)
                if cur.aggregator.spoiled:
                    return  # the round is being rebuilt
            if cur.closing is not None:
                self._try_close(cur, now)
        for blob, t in list(self.refused.items()):
            if now - t > 10 * self.s.chunk_timeout_s:
                del self.refused[blob]
        for e in [e for e in self.early if now - e.since > self.grace_s]:
            self.early.remove(e)
            self._reject(e.delivery, e.result, f"unknown job {e.result.job_id!r} or round {e.result.round} "
                                               f"(no round.open within {self.grace_s:g} s)")

    # --- control ----------------------------------------------------------------------

    def on_control(self, d: Delivery) -> None:
        """round.open, round.close, job events, control."""
        limit = self.s.max_body_bytes
        if d.msg_type == RoundOpen.TYPE:
            self.open_round(d, d.message(RoundOpen, limit))
        elif d.msg_type == RoundClose.TYPE:
            self.close_round(d, d.message(RoundClose, limit))
        elif d.msg_type == JobEvent.TYPE:
            ev = d.message(JobEvent, limit)
            if ev.status in (FINISHED, FAILED, ABORTED):
                self.ended.add(ev.job_id)
                cur = self.open.pop(ev.job_id, None)
                if cur is not None:
                    self.bus.ack_many(cur.held)
                    log.info("job %s %s: open round %d dropped", ev.job_id, ev.status, cur.round)
        elif d.msg_type == Control.TYPE:
            c = d.message(Control, limit)
            if c.command == "shutdown":
                log.info("shutdown requested")
                self.stop.set()
        else:
            raise Rejected(f"the aggregator queue does not take {d.msg_type!r} messages")

    def open_round(self, d: Delivery, m: RoundOpen) -> None:
        """Start accumulating a round; a new task id for the same round replaces the old one."""
        cur = self.open.get(m.job_id)
        if cur is not None:
            if cur.round == m.round and cur.task_id == m.task_id:
                return  # the same round.open twice: nothing new
            log.info("round %d of job %s replaced by round %d (task %s)", cur.round, m.job_id, m.round, m.task_id)
            self.bus.ack_many(cur.held)
        spec = {k: VarSpec(m.var_dtypes[k], tuple(m.var_shapes[k])) for k in m.var_dtypes if k in m.var_shapes}
        aggregator = _aggregator(m, spec)
        rnd = OpenRound(m.job_id, m.round, m.task_id, aggregator, [d],
                        persist=m.persist, forward=m.forward, commits=m.commits)
        try:
            rnd.filters = result_chain_from_wire(m.result_filters)
        except FilterError as err:  # never accumulate a result unfiltered
            rnd.filters_broken = f"the server's task_result_filters cannot run here: {err}"
            log.error("round %d of job %s: %s; every result is refused", m.round, m.job_id, rnd.filters_broken)
        d.deferred = True
        self.open[m.job_id] = rnd
        self.ended.discard(m.job_id)
        log.info("round %d of job %s open for %s%s", m.round, m.job_id, ", ".join(m.targets),
                 " (redelivered: rebuilding)" if d.redelivered else "")
        for e in [e for e in self.early if e.result.job_id == m.job_id]:
            self.early.remove(e)
            self._consider(e.delivery, e.result)

    def close_round(self, d: Delivery, m: RoundClose) -> None:
        """Publish the aggregate once every result the server counted is here, then ack the round."""
        cur = self.open.get(m.job_id)
        if cur is None or cur.round != m.round:
            if self.closed.get(m.job_id) == m.round or m.job_id in self.ended:
                return  # already closed: a redelivered round.close
            raise Rejected(f"round.close for round {m.round} of job {m.job_id}, which is not open")
        d.deferred = True
        cur.held.append(d)
        cur.closing, cur.closing_since = m, time.monotonic()
        self._try_close(cur, time.monotonic())

    def _answered(self, cur: OpenRound, r: TaskResult) -> None:
        """Note a target's answer; once every target answered, close the round without waiting."""
        if r.site in cur.aggregator.targets and r.round == cur.round and r.task_id == cur.task_id:
            cur.answered.add(r.site)
            found = reported_metrics(r.dxo.meta) if r.dxo is not None and r.site in cur.aggregator.accepted else {}
            if found:
                cur.metrics[r.site] = found
        if cur.closing is None and cur.all_answered():
            cur.closing = RoundClose(cur.job_id, cur.round, f"all {len(cur.aggregator.targets)} targets answered",
                                     sorted(cur.aggregator.accepted))
            cur.closing_since = time.monotonic()
            self._try_close(cur, cur.closing_since)

    def _try_close(self, cur: OpenRound, now: float) -> None:
        assert cur.closing is not None
        m, since = cur.closing, cur.closing_since
        missing = sorted(set(m.expected) - set(cur.aggregator.accepted))
        if missing and now - since < self.grace_s:
            return  # results accepted before a restart are being redelivered
        for st in list(cur.streams.values()):  # results still arriving when the round closed
            self._refuse_stream(cur, st, f"late: round {m.round} closed before all {st.parts} parts arrived")
            if cur.aggregator.spoiled:
                return  # the round is being rebuilt without it
        if missing:
            log.warning("round %d of job %s: results of %s never came back; aggregating without them",
                        m.round, m.job_id, ", ".join(missing))
        dxo = cur.aggregator.aggregate()
        for note in cur.aggregator.notes:  # where sagmq departs from NVFlare (README), the job's log says so
            log.warning("round %d of job %s: %s", m.round, m.job_id, note)
        agg = RoundAggregated(m.job_id, m.round, list(cur.aggregator.accepted), dxo, cur.task_id, cur.commits,
                              {s: v for s, v in cur.metrics.items() if s in cur.aggregator.accepted})
        log.info("aggregating %d update(s) at round %d of job %s (%s)", len(cur.aggregator.accepted), m.round,
                 m.job_id, m.reason)
        rk = RK_ROUND_AGGREGATED_SAVE if cur.persist and dxo is not None else RK_ROUND_AGGREGATED
        # one publish: the broker copies the body to the server, the persistor and each site forwarded to
        cc = [rk_aggregate(s) for s in agg.accepted] if cur.forward and dxo is not None else []
        self._send_aggregate(rk, agg, cur.held, cc)
        del self.open[m.job_id]
        self.closed[m.job_id] = m.round

    def _send_aggregate(self, rk: str, agg: RoundAggregated, held: list[Delivery], cc: list[str]) -> None:
        """Send without waiting (the loop keeps serving while a large aggregate leaves); the round's
        inputs are acked once it is confirmed. One the broker refuses (say, a permission missing)
        is tried again every RETRY_S seconds, the inputs still held, until it goes or the connection
        is replaced (the inputs then come back and the round is aggregated again)."""
        generation = self.bus.generation

        def sent(err: SagmqError | None) -> None:
            if err is None:
                self.bus.ack_many(held)  # the aggregate is confirmed: the inputs may go
            elif self.bus.generation == generation:
                log.error("the aggregate of round %d of job %s was not accepted (%s); trying again in %g s",
                          agg.round, agg.job_id, err, RETRY_S)
                self.retries.append((time.monotonic() + RETRY_S, rk, agg, held, cc))
                self.refused_aggregates += 1

        # not retained for a resend: after a lost connection the inputs come back and the round is
        # aggregated again, so the aggregate (a whole model) is freed once its last part is out
        self.bus.send(self.bus.names.events, rk, agg, headers={"job_id": agg.job_id, "round": agg.round},
                      cc=cc, on_done=sent, retain=False)

    # --- results ----------------------------------------------------------------------

    def on_result(self, d: Delivery) -> None:
        """Check a result's sender, then accept (held) or reject it (dead-lettered), with an event."""
        if d.msg_type != TaskResult.TYPE:
            raise Rejected(f"the results queue takes result messages, not {d.msg_type!r}")
        if is_part(d.headers):
            self.on_part(d)
            return
        r = d.message(TaskResult, self.s.max_body_bytes)
        self._check_sender(d, r)
        self._consider(d, r)

    def _check_sender(self, d: Delivery, r: TaskResult) -> None:
        if not d.user_id:
            raise Rejected("result without a user_id property: the sender is unknown")
        if d.header_str("site") and d.header_str("site") != r.site:
            raise Rejected(f"header site {d.header_str('site')!r} does not match body site {r.site!r}")
        if not self.s.may_speak_for(d.user_id, r.site):  # (own user, the site's, or a simulation user's)
            raise Rejected(f"spoofed sender: user {d.user_id!r} sent a result for site {r.site!r}")

    # --- large results, part by part ------------------------------------------------------

    def on_part(self, d: Delivery) -> None:
        """One part of a large result: the header opens a stream, data parts are added as they come."""
        blob, idx, n, size = part_info(d.headers)
        if blob in self.refused:
            d.deferred = True
            self.bus.ack(d)
            return
        for cur in self.open.values():
            st = cur.streams.get(blob)
            if st is not None:
                self._stream_part(cur, st, d, idx)
                return
        job, rnd = d.header_str("job_id"), d.header_str("round")
        if self._round_pending(job, rnd):
            since = self.pending.setdefault(blob, time.monotonic())
            if time.monotonic() - since < self.grace_s:
                time.sleep(0.01)  # its round.open is on its way (sent again after a broker restart)
                self.bus.requeue(d)
                return
        self.pending.pop(blob, None)
        if idx != 0:
            # parts come in order from one publisher: a data part without its header is left over
            # from a blob refused before a restart
            raise Rejected(f"part {idx} of blob {blob} without its header")
        self._open_stream(d, blob, n, size)

    def _round_pending(self, job: str, rnd: str) -> bool:
        """A result of a round whose round.open has not come yet (and is not stale)."""
        if not job or job in self.open or job in self.ended or not rnd.lstrip("-").isdigit():
            return False
        return int(rnd) > self.closed.get(job, -1)

    def _open_stream(self, d: Delivery, blob: str, n: int, size: int) -> None:
        """The header part of a large result: the round's aggregator checks it and takes the rest as it comes."""
        header = unpack(d.body, self.s.max_body_bytes)
        if size > self.s.max_model_bytes:
            raise Rejected(f"result of {size} bytes exceeds SAGMQ_MAX_MODEL_BYTES={self.s.max_model_bytes}")
        if not isinstance(header, dict) or not isinstance(header.get("dxo"), dict):
            raise DecodeError("large result without a dxo")
        head = read_stream_header(header["dxo"], n, size)
        r = from_wire(TaskResult, {**header, "dxo": None})
        self._check_sender(d, r)
        cur = self.open.get(r.job_id)
        if cur is None:
            self.refused[blob] = time.monotonic()
            self._reject(d, r, f"stale or unknown job {r.job_id}: no open round for a large result "
                               f"(round {r.round})")
            return
        try:
            self._check_round(cur, r)
            head = _filter_header(cur, r, head)
            status = cur.aggregator.begin_stream(blob, r.site, r.rc, head, r.error)
        except Rejected as e:
            self.refused[blob] = time.monotonic()
            self._reject(d, r, e.reason)
            return
        d.deferred = True
        found = reported_metrics(header["dxo"].get("meta"))
        if found:  # (sent with the aggregate only if the whole result is accepted)
            cur.metrics[r.site] = found
        st = cur.streams[blob] = Stream(blob, r, n, [d])
        if status.complete:
            self._stream_done(cur, st)

    def _stream_part(self, cur: OpenRound, st: Stream, d: Delivery, idx: int) -> None:
        """A data part: held (acked with the round), added by the aggregator unless it came before."""
        d.deferred = True
        st.held.append(d)
        try:
            status = cur.aggregator.add_part(st.blob, idx, d.headers, d.body)
        except Rejected as e:
            self._refuse_stream(cur, st, e.reason)
            return
        if not status.duplicate:
            d.body = b""  # added to the sums: hold only the delivery tag
        if status.complete:
            self._stream_done(cur, st)

    def _stream_done(self, cur: OpenRound, st: Stream) -> None:
        """Every part of a large result is in: it counts like a whole one."""
        del cur.streams[st.blob]
        cur.held.extend(st.held)
        self._verdict(st.result, True, "")
        log.info("contribution from %s ACCEPTED at round %d of job %s (%d parts)", st.result.site,
                 st.result.round, st.result.job_id, st.parts)
        self._answered(cur, st.result)
        if cur.closing is not None and cur.job_id in self.open:
            self._try_close(cur, time.monotonic())

    def _refuse_stream(self, cur: OpenRound, st: Stream, reason: str) -> None:
        """Turn away a large result; if part of it was already added, rebuild the round without it."""
        cur.streams.pop(st.blob, None)
        cur.aggregator.drop_stream(st.blob)
        self.refused[st.blob] = time.monotonic()
        self._verdict(st.result, False, reason)
        self.bus.dead_letter(st.held[0], reason)
        for p in st.held[1:]:
            self.bus.ack(p)
        if cur.aggregator.spoiled:
            log.warning("round %d of job %s: rebuilding without the refused result of %s",
                        cur.round, cur.job_id, st.result.site)
            self.bus.reset("rebuild the round without a refused result")
        elif cur.closing is None:
            self._answered(cur, st.result)

    def _check_round(self, cur: OpenRound, r: TaskResult) -> None:
        if r.round != cur.round:
            raise Rejected(f"stale or wrong round: result for round {r.round}, round {cur.round} is open")
        if r.task_id != cur.task_id:
            raise Rejected(f"result for task {r.task_id}, not the current task {cur.task_id} of round {r.round}")
        if cur.closing is not None and r.site not in cur.closing.expected:
            raise Rejected(f"late: round {r.round} is closing")

    def _consider(self, d: Delivery, r: TaskResult) -> None:
        cur = self.open.get(r.job_id)
        if cur is None:
            if r.job_id in self.ended or r.round <= self.closed.get(r.job_id, -1):
                self._reject(d, r, f"stale: job {r.job_id} has no open round (result for round {r.round})")
            else:  # its round.open may still be on its way (sent again after a broker restart)
                d.deferred = True
                self.early.append(Early(d, r, time.monotonic()))
            return
        try:
            self._check_round(cur, r)
            cur.aggregator.accept(r.site, r.rc, _filtered(cur, r), r.error)
        except Rejected as e:
            self._reject(d, r, e.reason)
            return
        d.deferred = True
        d.body = b""  # added to the sums: hold only the delivery tag, not the result
        cur.held.append(d)
        log.info("contribution from %s ACCEPTED at round %d of job %s", r.site, r.round, r.job_id)
        self._answered(cur, r)  # the last answer sends the aggregate first
        if cur.closing is not None and cur.job_id in self.open:
            self._try_close(cur, time.monotonic())
        # the verdict waits for the next tick: if the round closes first, its aggregate lists the site as
        # accepted, which is all the verdict would tell the server (fast rounds send none). Without its
        # weights: a result is in the sums already, and at 1000 sites × 4 MB the results of one tick held
        # whole were most of the aggregator's peak (issue 15)
        self.accepted_verdicts.append(replace(r, dxo=None))

    def _flush_verdicts(self) -> None:
        """Publish the accepted verdicts of rounds still open (the server's round rules count them)."""
        pending, self.accepted_verdicts = self.accepted_verdicts, []
        for r in pending:
            cur = self.open.get(r.job_id)
            if cur is not None and cur.round == r.round and cur.task_id == r.task_id:
                self._verdict(r, True, "")

    def _reject(self, d: Delivery, r: TaskResult, reason: str) -> None:
        self._verdict(r, False, reason)
        d.deferred = True  # dead_letter acks it
        self.bus.dead_letter(d, reason)
        cur = self.open.get(r.job_id)
        if cur is not None and cur.closing is None:
            self._answered(cur, r)

    def _verdict(self, r: TaskResult, accepted: bool, reason: str) -> None:
        ev = Contribution(r.job_id, r.round, r.site, accepted, r.rc, reason, r.task_id)
        # transient: after a broker restart the aggregator rebuilds and sends its verdicts again
        self.bus.publish(self.bus.names.events, RK_CONTRIBUTION, ev, advisory=True,
                         headers={"job_id": r.job_id, "round": r.round, "site": r.site})


def _filtered(cur: OpenRound, r: TaskResult) -> DXO | None:
    """A whole result's DXO through the server's task_result_filters (sagmq.filters.sides says why here);
    Rejected if they cannot run or fail (the result is not counted unfiltered)."""
    if r.rc != RC_OK or r.dxo is None:
        return r.dxo  # NVFlare's filters pass an error result as it is; the aggregator refuses it
    if cur.filters_broken:
        raise Rejected(cur.filters_broken)
    if not cur.filters.for_task(TASK_RESULT, r.task_name):
        return r.dxo
    try:
        return cur.filters.run(TASK_RESULT, r.dxo, FilterContext("server", r.job_id, r.round, r.task_name,
                                                                  TASK_RESULT))
    except FilterError as e:
        raise Rejected(f"{RC_TASK_RESULT_FILTER_ERROR}: the server's {e}") from e


def _filter_header(cur: OpenRound, r: TaskResult, head: StreamHeader) -> StreamHeader:
    """A streamed result's header through the server's task_result_filters: ExcludeVars drop variables
    from it; any other filter needs the whole result, which a streamed one never is here (Rejected)."""
    if r.rc != RC_OK:
        return head
    if cur.filters_broken:
        raise Rejected(cur.filters_broken)
    if not cur.filters.for_task(TASK_RESULT, r.task_name):
        return head
    excludes = only_excludes(cur.filters, r.task_name)
    if excludes is None:
        raise Rejected("the server's task_result_filters need the whole result, and this one came in parts "
                       "(larger than SAGMQ_CHUNK_BYTES): only ExcludeVars runs on those; use the filter on the "
                       "sites (config_fed_client.json) instead")
    arrays = dict(head.arrays)
    for f in excludes:
        if head.kind in f.data_kinds:
            arrays = {k: v for k, v in arrays.items() if not f.excluded(k)}
    return replace(head, arrays=arrays)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `sagmq aggregator`."""
    return serve("aggregator", AggregatorService, argv, keep_freed=True)
