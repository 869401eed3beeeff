"""ScatterAndGather: one job's rounds as a pure state machine (events and the clock in, effects out).

The server service feeds this class the messages it receives and a tick with the sites it hears
from; the class answers with effects (frozen dataclasses) that the service carries out on the bus,
in the order given. Nothing here publishes, sleeps or reads a clock; times are passed in (``now``,
monotonic seconds; wall times in round records are ``now + wall_offset``).

Round rules (NVFlare's, see docs/protocol.md): a round closes when every target answered, or
when min_clients answered and wait_time_after_min_received passed since, or when train_timeout
(if not 0) passed since it opened, or when every target still owing an answer stopped
heartbeating. Error results follow ignore_result_error (True: ignored; False: the job fails;
None: the job fails once the remaining good targets cannot reach min_clients). An aggregate of
fewer than min_clients accepted results fails the job; so does a site's UNSAFE_JOB. The model is
saved when (round + 1) % persist_every_n_rounds == 0 and always after the last round
(persist_every_n_rounds = 0: the last round only).

Persist / forward / commit, decided here once, when a round opens and when its aggregate comes:

- persist: the aggregate is WEIGHTS over every variable (it *is* the next global model) and the
  round is saved: round.open asks the aggregator to route it to the persistor too, which holds it
  until the server confirms it with a small model.commit. Otherwise the server sends the new
  model whole in model.save.
- implied commit: a held aggregate below IMPLIED_COMMIT_MAX_BYTES gets no model.commit of its own
  while commits go out often (less than COMMIT_EVERY_S apart): the next round's round.open names
  its task (``commits``), and that round's aggregate tells the persistor to save it.
- forward: a whole aggregate of at least forward_min_bytes that another round will follow is
  also routed to the contributing sites' queues; the next task only names it (``model_from``).
  A site that lacks it says so in its heartbeat and gets the whole task.

Ordering rules (the effects come in this order; the adapter keeps it on one sending channel):

1. round.open goes before the round's task (both to the aggregator's and the sites' side).
2. A small model.commit goes before the next round's task, so it reaches the persistor ahead of
   the next aggregate (which replaces a held one: a commit behind it would find nothing to save).
3. A whole model.save goes after the next round's task: the sites need not wait for the disk.
4. An implied commit left pending is sent as a model.commit before a whole model.save and before
   the job ends (the persistor drops what it holds on either).
5. A job's end event goes after its final commit on the same channel (``EndJob.ordered``).
6. The final round waits for model.saved before the job finishes.

No phase waits without a retry or a limit: WAITING fails after schedule_timeout_s; TRAINING
closes by the round rules and re-sends the whole task, once a round, to a target that came back
(a new process since the round opened: a site acks its task on arrival, so a restart loses it),
owes an answer and has been idle for ``idle_grace_s`` (RETURNED_IDLE_HEARTBEATS = 3 heartbeats,
whatever client_timeout_s is: a new process cannot be running the task its predecessor took, and
a task still in its queue reaches it, and shows in its heartbeat as busy, within a heartbeat or
two; a site back before it was missed must not wait for train_timeout), and after a reconnect (the
broker may have restarted and dropped the task, which travels transient) to every target that owes
an answer and stays idle that long; AGGREGATING re-sends
round.close every ROUND_CLOSE_RESEND_S; LOADING and SAVING re-send model.load / the final model
(as a whole model.save) once after persistor_retry_s (60 s) and fail the job after
persistor_timeout_s (600 s). While the persistor reports that its disk refuses a save (model.saved
with an error), SAVING sends nothing again: the persistor retries, and gives up by itself (the job
then fails with its error); the 600 s count from its last report.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from sagmq.job.spec import JobSpec, SAGConfig
from sagmq.server.full_model_shareable_generator import FullModelShareableGenerator, collection_metrics
from sagmq.wire.codec import DXO, WEIGHTS
from sagmq.wire.errors import SagmqError
from sagmq.wire.messages import (
    ABORTED,
    FAILED,
    FINISHED,
    RC_OK,
    RC_UNSAFE_JOB,
    Contribution,
    Control,
    ModelCommit,
    ModelLoad,
    ModelLoaded,
    ModelSave,
    ModelSaved,
    RoundAggregated,
    RoundClose,
    RoundOpen,
    TrainTask,
)

log = logging.getLogger(__name__)

# A held aggregate below this size is committed by the next round's opening (RoundOpen.commits)
# instead of a model.commit of its own, unless no commit went for COMMIT_EVERY_S.
IMPLIED_COMMIT_MAX_BYTES = 1 << 20
COMMIT_EVERY_S = 1.0
# The aggregator may have lost round.close (advisory): sent again after this long with no aggregate.
ROUND_CLOSE_RESEND_S = 5.0
# model.load / the final save are sent once more after PERSISTOR_RETRY_S without an answer; the
# job fails after PERSISTOR_TIMEOUT_S. Generous: a multi-GiB model takes a while to read or write,
# and a resend of one costs as much again.
PERSISTOR_RETRY_S = 60.0
PERSISTOR_TIMEOUT_S = 600.0
# A target that came back as a new process and heartbeats idle this many heartbeats gets its task
# again: a task still in its queue would have reached it (and made it busy) by then.
RETURNED_IDLE_HEARTBEATS = 3


class Phase(str, Enum):  # noqa: UP042 (StrEnum needs Python 3.11; the package supports 3.10)
    """Where a job's rounds are; the value is what `sagmq status` shows."""

    LOADING = "loading"  # model.load sent, waiting for model.loaded
    WAITING = "waiting"  # a round waits for min_clients sites to be alive
    TRAINING = "training"  # the task is out; contributions come in
    AGGREGATING = "aggregating"  # round.close sent, waiting for round.aggregated
    SAVING = "saving"  # the final round's model went to the persistor, waiting for model.saved
    DONE = "done"  # the job ended

    def __str__(self) -> str:
        return self.value


# --- round records ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rejection:
    """A result the aggregator turned away, and why."""

    site: str
    rc: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        """As stored in a round record."""
        return {"site": self.site, "rc": self.rc, "reason": self.reason}


_LATER_KEYS = ("close_reason", "aggregated", "closed_at", "seconds", "done_at", "saved_at", "metrics")
_KNOWN_KEYS = frozenset(("round", "task_id", "targets", "accepted", "rejected", "started_at", *_LATER_KEYS))


@dataclass(slots=True)
class RoundRecord:
    """What happened in one round: the job's history (status, download, history.json) lists these.

    The keys after started_at appear in the dict only once they are known (a round that is
    still open has no ``aggregated``; one not yet on disk has no ``saved_at``).
    """

    round: int
    task_id: str
    targets: list[str]
    started_at: float
    accepted: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    close_reason: str | None = None
    aggregated: list[str] | None = None
    closed_at: float | None = None
    seconds: float | None = None
    done_at: float | None = None
    saved_at: float | None = None
    metrics: dict[str, dict[str, float]] | None = None  # site -> what its accepted result reported (loss, ...)
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know: kept as they were

    def to_dict(self) -> dict[str, Any]:
        """The record as a plain dict (jobs.json, status replies, history.json)."""
        out: dict[str, Any] = {"round": self.round, "task_id": self.task_id, "targets": list(self.targets),
                               "accepted": list(self.accepted), "rejected": [r.to_dict() for r in self.rejected],
                               "started_at": self.started_at}
        for key in _LATER_KEYS:
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if isinstance(value, list) else value
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoundRecord:
        """A record from its dict (to_dict's inverse)."""
        rejected = [Rejection(str(x.get("site", "")), str(x.get("rc", "")), str(x.get("reason", "")))
                    for x in d.get("rejected", ())]
        agg = d.get("aggregated")
        return cls(int(d["round"]), str(d.get("task_id", "")), list(d.get("targets", ())),
                   float(d.get("started_at", 0.0)), list(d.get("accepted", ())), rejected,
                   d.get("close_reason"), None if agg is None else list(agg), d.get("closed_at"),
                   d.get("seconds"), d.get("done_at"), d.get("saved_at"),
                   d.get("metrics") if isinstance(d.get("metrics"), dict) else None,
                   {k: v for k, v in d.items() if k not in _KNOWN_KEYS})


# --- inputs and effects ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SiteState:
    """What a site's heartbeats said: the job and round it is running ("" / -1: idle), and since when
    its process runs (the monotonic time of its hello, or of the first heartbeat with a new pid)."""

    busy_job: str = ""
    busy_round: int = -1
    since: float = 0.0  # when this process of the site was first heard


@dataclass(frozen=True, slots=True)
class LoadModel:
    """Ask the persistor for the job's starting model (model.load; confirmed publish)."""

    message: ModelLoad


@dataclass(frozen=True, slots=True)
class OpenRound:
    """Tell the aggregator a round opened (round.open; advisory publish)."""

    message: RoundOpen


@dataclass(frozen=True, slots=True)
class CloseRound:
    """Tell the aggregator to aggregate now (round.close; advisory publish)."""

    message: RoundClose


@dataclass(frozen=True, slots=True)
class SendTask:
    """The round's task to these sites: one send, fanned out by the broker. The task carries the
    whole model, or names a forwarded aggregate (``task.model_from``) and carries none."""

    sites: tuple[str, ...]
    task: TrainTask
    expiration_s: float | None = None  # train_timeout: a task no one took by then is of no use (NVFlare's TTL)
    # transient (delivery mode 1): the broker keeps it in memory only; a restart of the broker loses it,
    # and the round's re-send rule (on_reconnect, _resend_to_idle) sends the whole task again
    transient: bool = False


@dataclass(frozen=True, slots=True)
class Persist:
    """model.commit or model.save to the persistor, sent in order. A failed send of a final one
    goes back to the core (ScatterAndGather.on_persist_failed)."""

    message: ModelCommit | ModelSave


@dataclass(frozen=True, slots=True)
class ControlSites:
    """A control message (abort) to these sites, one publish fanned out by the broker."""

    sites: tuple[str, ...]
    message: Control


@dataclass(frozen=True, slots=True)
class EndJob:
    """The job ended. ordered: a model.commit was just sent, so the job event goes on the same
    sending channel behind it (the persistor drops what it holds when the job ends)."""

    status: str
    reason: str = ""
    ordered: bool = False


Effect = LoadModel | OpenRound | CloseRound | SendTask | Persist | ControlSites | EndJob
Effects = list[Effect]


def should_persist(cfg: SAGConfig, rnd: int) -> bool:
    """NVFlare's rule: every n rounds ((r+1) % n == 0), and always the last round; n=0 means last only."""
    last = rnd == cfg.start_round + cfg.num_rounds - 1
    n = cfg.persist_every_n_rounds
    return last or (n > 0 and (rnd + 1) % n == 0)


# --- one round ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Round:
    """The bookkeeping of the round that is open (or was the last one)."""

    cfg: SAGConfig
    number: int
    task_id: str
    targets: tuple[str, ...]
    started: float
    opening: RoundOpen
    closing: RoundClose | None = None
    responded: dict[str, bool] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    min_reached_at: float | None = None
    whole_sent_at: dict[str, float] = field(default_factory=dict)  # site -> when it last got the whole task again
    idle_since: dict[str, float] = field(default_factory=dict)  # outstanding target -> first seen idle
    reconnected: bool = False  # the broker may have restarted since the task went out (it was transient)

    def answer(self, site: str, accepted: bool, rc: str, now: float) -> str | None:
        """Record a target's answer; return a reason if the job must fail because of it."""
        if site not in self.targets or site in self.responded:
            return None  # not ours, or a duplicate the aggregator already turned away
        self.responded[site] = accepted
        if self.min_reached_at is None and len(self.responded) >= self.cfg.min_clients:
            self.min_reached_at = now
        if rc == RC_OK or self.cfg.ignore_result_error is True:
            return None
        if self.cfg.ignore_result_error is False:
            return f"result from {site} is bad (rc {rc}) and ignore_result_error is false; round {self.number}"
        self.failed.add(site)
        good = len(self.targets) - len(self.failed)
        if good < self.cfg.min_clients:
            return (f"cannot reach min_clients at round {self.number}: remaining good sites ({good}) "
                    f"< min_clients ({self.cfg.min_clients}); failed: {', '.join(sorted(self.failed))}")
        return None

    def close_reason(self, now: float, alive: Collection[str]) -> str | None:
        """Why the round should close now, or None to keep waiting."""
        cfg = self.cfg
        if self.all_answered():
            return f"all {len(self.targets)} targets answered"
        if self.min_reached_at is not None and now - self.min_reached_at >= cfg.wait_time_after_min_received:
            return (f"{len(self.responded)} answered (min_clients {cfg.min_clients}) and "
                    f"wait_time_after_min_received ({cfg.wait_time_after_min_received:g} s) passed")
        if cfg.train_timeout > 0 and now - self.started >= cfg.train_timeout:
            return f"train_timeout ({cfg.train_timeout:g} s) reached with {len(self.responded)} answer(s)"
        outstanding = self.outstanding()
        if outstanding and not any(t in alive for t in outstanding):
            return f"sites {', '.join(outstanding)} stopped answering"
        return None

    def all_answered(self) -> bool:
        """Every target answered (the aggregator then closes the round by itself)."""
        return len(self.responded) == len(self.targets)

    def outstanding(self) -> list[str]:
        """Targets that owe an answer."""
        return [t for t in self.targets if t not in self.responded]

    def accepted(self) -> list[str]:
        """Targets whose result was accepted."""
        return [s for s, ok in self.responded.items() if ok]


# --- the workflow ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PersistorTrouble:
    """What the persistor last said of a save its disk refuses (a model.saved with an error)."""

    round: int
    error: str
    retrying_s: float  # how long it had been retrying when it said so
    heard_at: float

    def describe(self, now: float) -> str:
        """As `sagmq status` shows it."""
        return f"persistor: {self.error} (retrying since {self.retrying_s + now - self.heard_at:.0f} s)"


class ScatterAndGather:
    """One job's rounds: the global model, the open round, the history, and the protocol plan."""

    def __init__(self, job_id: str, spec: JobSpec, *, heartbeat_s: float, schedule_timeout_s: float,
                 forward_min_bytes: int, wall_offset: float = 0.0, history: Iterable[RoundRecord] = (),
                 generator: FullModelShareableGenerator | None = None,
                 persistor_retry_s: float = PERSISTOR_RETRY_S,
                 persistor_timeout_s: float = PERSISTOR_TIMEOUT_S) -> None:
        self.job_id = job_id
        self.spec = spec
        self.sag = spec.sag
        self.schedule_timeout_s = schedule_timeout_s
        self.forward_min_bytes = forward_min_bytes
        self.heartbeat_s = heartbeat_s
        # a target that came back and has been idle this long gets the whole task again (once a round):
        # long enough for a task still in its queue to reach it; not client_timeout_s, as the site never
        # goes silent (a container restarted within a second)
        self.idle_grace_s = RETURNED_IDLE_HEARTBEATS * heartbeat_s
        self.wall_offset = wall_offset
        self.persistor_retry_s = persistor_retry_s
        self.persistor_timeout_s = persistor_timeout_s
        self.generator = generator or FullModelShareableGenerator()
        self.apps = spec.client_apps()
        self.phase = Phase.LOADING
        self.phase_since = 0.0
        self.round: int | None = None
        self.weights: dict[str, np.ndarray] = {}
        self.history: list[RoundRecord] = list(history)
        self.record: RoundRecord | None = None  # the open round's record
        self._round: _Round | None = None
        self._alive: frozenset[str] = frozenset()
        self._sites: Mapping[str, SiteState] = {}
        self._history_sent = 0  # history[:_history_sent] went to the persistor already
        # history_dicts() of history[:_dicts_clean], unchanged since (status and jobs.json ask for the whole
        # history often; a job of thousands of short rounds must not rebuild every record each time)
        self._dicts: list[dict[str, Any]] = []
        self._dicts_clean = 0
        # (task id, sites): the aggregate of that task, which is the model now, sits in these sites' queues
        self._forwarded: tuple[str, frozenset[str]] = ("", frozenset())
        # (round, task id): an aggregate that is the model now, held uncommitted by the persistor
        self._uncommitted: tuple[int, str] | None = None
        self._committed_at = -1e9  # when the last model.commit or model.save went
        self._final: ModelCommit | ModelSave | None = None  # the final round's save, while SAVING
        self._retried = False  # model.load or the final save went again in this phase
        self.persistor_trouble: PersistorTrouble | None = None  # the persistor's disk refuses a save: why

    # --- views -------------------------------------------------------------------------------

    @property
    def last_round(self) -> int:
        """The number of the job's last round."""
        return self.sag.start_round + self.sag.num_rounds - 1

    @property
    def targets(self) -> tuple[str, ...]:
        """The targets of the open (or last) round."""
        return self._round.targets if self._round else ()

    @property
    def task_id(self) -> str:
        """The task id of the open (or last) round ('' before the first)."""
        return self._round.task_id if self._round else ""

    def history_dicts(self) -> list[dict[str, Any]]:
        """The job's round records as plain dicts (a new list; its dicts are shared with later calls until
        their record changes: read them, do not change them). Records change after they join the history
        only through _touched (the last one, saves); the last two are rebuilt on every call anyway."""
        clean = min(self._dicts_clean, len(self.history) - 2, len(self._dicts))
        clean = max(clean, 0)
        del self._dicts[clean:]
        self._dicts.extend(h.to_dict() for h in self.history[clean:])
        self._dicts_clean = len(self.history)
        return list(self._dicts)

    def _touched(self, index: int) -> None:
        """history[index] (and maybe later records) changed: their dicts are made again."""
        self._dicts_clean = min(self._dicts_clean, max(index, 0))

    def waiting_for(self, now: float) -> str:
        """What the job waits for, in words (`sagmq status`); the persistor's disk error while it retries one."""
        trouble = self.persistor_trouble
        if trouble is not None and self.phase == Phase.SAVING:
            return trouble.describe(now)
        rnd = self._round
        text = {
            Phase.LOADING: "persistor: the job's model (model.loaded)",
            Phase.WAITING: f"sites: min_clients={self.sag.min_clients} alive ({len(self._alive)} are)",
            Phase.TRAINING: f"sites: results of round {self.round} from {', '.join(rnd.outstanding()) if rnd else ''}",
            Phase.AGGREGATING: f"aggregator: the aggregate of round {self.round}",
            Phase.SAVING: f"persistor: model.saved of the final round {self.round}",
        }.get(self.phase)
        if text is None:
            return ""
        text += f" (for {now - self.phase_since:.0f} s)"
        return text if trouble is None else f"{text}; {trouble.describe(now)}"

    # --- events ------------------------------------------------------------------------------

    def start(self, now: float, alive: Collection[str] = ()) -> Effects:
        """Begin (or resume) the job: ask the persistor for its model."""
        self._alive = frozenset(alive)
        self._enter(Phase.LOADING, now)
        return [LoadModel(self._load_request())]

    def on_loaded(self, m: ModelLoaded, now: float) -> Effects:
        """The starting model came: the first round (or the one after the last saved) opens."""
        if self.phase != Phase.LOADING:
            return []
        if m.error or m.dxo is None:
            return self._end(FAILED, m.error or "the persistor sent no model", now)
        self.weights = {k: v if v.flags.writeable else np.array(v) for k, v in m.dxo.data.items()}
        resume = m.next_round if m.source == "saved" and m.next_round >= 0 else None
        self.round = self.sag.start_round if resume is None else resume
        # rounds after the last saved one will run again: forget what was recorded of them; the persistor's
        # records fill the earlier rounds this server's copy lacks (jobs.json lags the rounds), and the
        # next save sends the persistor the whole history back
        self.history = self._history_before(self.round, m.history)
        self._history_sent = 0
        self._touched(0)
        log.info("job %s: model loaded from %s; starting at round %d", self.job_id, m.source, self.round)
        if self.round > self.last_round:
            return self._end(FINISHED, "", now)
        return self._open_round(now)

    def _history_before(self, r: int, theirs: Iterable[Mapping[str, Any]]) -> list[RoundRecord]:
        """The records of the rounds before r, one per round: this server's own, else the persistor's."""
        by_round = {h.round: h for h in self.history if h.round < r}
        for d in theirs:
            try:
                rec = RoundRecord.from_dict(d)
            except (AttributeError, KeyError, TypeError, ValueError) as e:  # whatever history.json held
                log.warning("job %s: ignoring a round record the persistor sent: %s: %s", self.job_id,
                            type(e).__name__, e)
                continue
            if rec.round < r:
                by_round.setdefault(rec.round, rec)
        return sorted(by_round.values(), key=lambda h: h.round)

    def on_contribution(self, c: Contribution, now: float) -> Effects:
        """The aggregator's verdict on a site's result."""
        rnd, rec = self._round, self.record
        if (self.phase != Phase.TRAINING or rnd is None or rec is None or c.round != self.round
                or (c.task_id and c.task_id != rnd.task_id)):
            log.info("late verdict on %s for round %d of job %s: %s", c.site, c.round, c.job_id,
                     "accepted" if c.accepted else c.reason)
            return []
        if c.accepted:
            if c.site in rec.accepted:
                return []  # the aggregator re-accepted a redelivered result after a restart
            rec.accepted.append(c.site)
            log.info("Contribution from %s ACCEPTED at round %d", c.site, c.round)
        else:
            entry = Rejection(c.site, c.rc, c.reason)
            if entry not in rec.rejected:
                rec.rejected.append(entry)
            log.warning("Contribution from %s REJECTED at round %d: %s", c.site, c.round, c.reason)
        if c.rc == RC_UNSAFE_JOB:
            return self._end(FAILED, f"site {c.site} refused the job: {c.reason}", now)
        fail = rnd.answer(c.site, c.accepted, c.rc, now)
        if fail is not None:
            return self._end(FAILED, fail, now)
        reason = rnd.close_reason(now, self._alive)
        if reason is not None and not rnd.all_answered():  # all answered: the aggregator closes it
            return self._close_round(reason, now)
        return []

    def on_aggregated(self, m: RoundAggregated, now: float) -> Effects:
        """The round's aggregate: apply it, record the round, then save and/or open the next."""
        rec = self.record
        if self.phase not in (Phase.TRAINING, Phase.AGGREGATING) or m.round != self.round or rec is None:
            log.info("ignoring aggregate of round %d of job %s (phase %s)", m.round, m.job_id, self.phase)
            return []
        if self.phase == Phase.TRAINING:  # the aggregator closed it: every target had answered
            rec.close_reason = f"all {len(rec.targets)} targets answered"
        self._record_close(rec, m.accepted, now, m.metrics)
        if len(m.accepted) < self.sag.min_clients:
            rejected = "; ".join(f"{x.site}: {x.reason}" for x in rec.rejected) or "none"
            return self._end(FAILED, f"round {m.round} ended with {len(m.accepted)} accepted result(s), fewer than "
                                     f"min_clients={self.sag.min_clients} ({rec.close_reason}; rejected: {rejected})",
                             now)
        try:
            self.weights = self.generator.shareable_to_learnable(m.dxo, self.weights)
        except SagmqError as e:
            return self._end(FAILED, f"round {m.round}: {e}", now)
        key_metrics = collection_metrics(m.dxo)
        if key_metrics:  # a COLLECTION's METRICS sub-DXOs are recorded in the round's history, not applied
            rec.extra["collection_metrics"] = key_metrics
        # the aggregate's arrays are the model now (WEIGHTS over every variable)
        whole = m.dxo is not None and m.dxo.kind == WEIGHTS and set(m.dxo.data) == set(self.weights)
        ours = self._round is not None and m.task_id == self._round.task_id and whole
        if ours and self._round is not None and self._round.opening.forward:
            self._forwarded = (m.task_id, frozenset(m.accepted))  # the aggregator sent them this model
        self.history.append(rec)
        self.record = None
        log.info("Round %d of job %s finished with %d contribution(s)", m.round, self.job_id, len(m.accepted))
        return self._persist_and_advance(m, ours, now)

    def on_saved(self, m: ModelSaved, now: float) -> Effects:
        """The persistor saved rounds up to m.round (it confirms several at once, at most once a second);
        with an error, its disk refused the round's save, which it retries (or gave up on: the job fails)."""
        if m.error:
            return self._save_refused(m, now)
        if self.persistor_trouble is not None and m.round >= self.persistor_trouble.round:
            log.info("job %s: the persistor saves again (round %d is on disk)", self.job_id, m.round)
            self.persistor_trouble = None
        wall = self._wall(now)
        for i, h in enumerate(self.history):
            if h.round <= m.round and h.saved_at is None:
                h.saved_at = wall
                self._touched(i)
        if self.phase == Phase.SAVING and m.round == self.round:
            return self._advance(now)
        return []

    def _save_refused(self, m: ModelSaved, now: float) -> Effects:
        """The persistor's disk refuses a save: `sagmq status` shows it while the persistor retries; the job
        fails with the persistor's error once it gives up (SAGMQ_PERSIST_RETRY_LIMIT_S)."""
        if self.phase == Phase.DONE:
            return []
        old = self.persistor_trouble
        if old is None or old.error != m.error:
            log.warning("job %s: the persistor cannot save round %d and retries: %s", self.job_id, m.round, m.error)
        self.persistor_trouble = PersistorTrouble(m.round, m.error, m.retrying_s, now)
        if m.gave_up:
            return self._end(FAILED, f"round {m.round}: the persistor could not save the model and gave up after "
                                     f"retrying for {m.retrying_s:.0f} s: {m.error}", now)
        return []

    def on_persist_failed(self, rnd: int, error: str, now: float) -> Effects:
        """A final model.commit / model.save could not be sent: the job fails."""
        if self.phase != Phase.SAVING or rnd != self.round:
            return []
        return self._end(FAILED, f"round {rnd}: the final model could not be sent to the persistor: {error}", now)

    def on_tick(self, now: float, alive: Collection[str], sites: Mapping[str, SiteState]) -> Effects:
        """Time passed: close a round whose time has come, retry what got no answer, fail what waited too long."""
        self._alive = frozenset(alive)
        self._sites = sites
        if self.phase == Phase.TRAINING:
            return self._tick_training(now)
        if self.phase == Phase.WAITING:
            return self._open_round(now)
        if self.phase == Phase.AGGREGATING:
            return self._tick_aggregating(now)
        if self.phase in (Phase.LOADING, Phase.SAVING):
            return self._tick_persistor(now)
        return []

    def on_missing_model(self, site: str, task_id: str, now: float) -> Effects:
        """A site got a task naming a forwarded model it does not have: send it the whole task."""
        rnd, rec = self._round, self.record
        if (self.phase != Phase.TRAINING or rnd is None or rec is None or task_id != rnd.task_id
                or site not in rnd.targets or site in rec.accepted):
            return []
        if now - rnd.whole_sent_at.get(site, -1e9) < max(2.0, 2 * self.heartbeat_s):
            return []  # sent just now; it is on its way
        rnd.whole_sent_at[site] = now
        log.info("site %s lacks the forwarded model of round %s of job %s: sending it the whole task", site,
                 self.round, self.job_id)
        return [self._whole_task((site,))]

    def on_reconnect(self, now: float) -> Effects:
        """The broker may have restarted (it drops advisory messages): the aggregator gets the open round again."""
        rnd = self._round
        if rnd is None or self.phase not in (Phase.TRAINING, Phase.AGGREGATING):
            return []
        log.info("reconnected: sending round %s of job %s to the aggregator again", self.round, self.job_id)
        if self.phase == Phase.TRAINING:  # a restarted broker dropped the transient task from the queues:
            rnd.reconnected = True  # every outstanding target idle for idle_grace_s gets the whole task again
            rnd.whole_sent_at.clear()
            rnd.idle_since.clear()
        out: Effects = [OpenRound(rnd.opening)]
        if rnd.closing is not None:
            out.append(CloseRound(rnd.closing))
        return out

    def abort(self, reason: str, now: float) -> Effects:
        """The admin aborted the job."""
        if self.phase == Phase.DONE:
            return []
        return self._end(ABORTED, reason, now)

    # --- ticks -------------------------------------------------------------------------------

    def _tick_training(self, now: float) -> Effects:
        rnd = self._round
        assert rnd is not None
        out = self._resend_to_idle(rnd, now)
        reason = rnd.close_reason(now, self._alive)
        if reason is not None:
            out += self._close_round(reason, now)
        return out

    def _resend_to_idle(self, rnd: _Round, now: float) -> Effects:
        """A target that is alive, owes an answer, came back since the round opened (a new process: the old
        one had acked the task) and has run nothing of this round for idle_grace_s gets the whole task
        again, once a round. A site that kept its process still has the task (queued or in memory):
        sending a large model again because its transfer is slow would only double it."""
        out: Effects = []
        for site in rnd.outstanding():
            state = self._sites.get(site)
            if site not in self._alive or state is None or site in rnd.whole_sent_at:
                continue
            busy = state.busy_job == self.job_id and state.busy_round == rnd.number
            if busy or (state.since <= rnd.started and not rnd.reconnected):  # working on it, or the process
                # that got the task (and still has it: no broker restart can have dropped it)
                rnd.idle_since.pop(site, None)
                continue
            since = rnd.idle_since.setdefault(site, now)
            if now - since >= self.idle_grace_s:
                rnd.whole_sent_at[site] = now
                why = ("is idle after a reconnect (a restarted broker drops the transient task)" if rnd.reconnected
                       else "came back idle")
                log.warning("site %s %s but owes round %d of job %s: sending it the whole task again",
                            site, why, rnd.number, self.job_id)
                out.append(self._whole_task((site,)))
        return out

    def _tick_aggregating(self, now: float) -> Effects:
        rnd = self._round
        if rnd is None or rnd.closing is None or now - self.phase_since <= ROUND_CLOSE_RESEND_S:
            return []
        log.warning("no aggregate of round %s of job %s yet: sending round.close again", self.round, self.job_id)
        self.phase_since = now
        return [CloseRound(rnd.closing)]

    def _tick_persistor(self, now: float) -> Effects:
        """LOADING waits for model.loaded, SAVING for model.saved: send once more, then give up."""
        waited = now - self.phase_since
        loading = self.phase == Phase.LOADING
        if not loading and self.persistor_trouble is not None:
            return self._tick_refused_save(self.persistor_trouble, now)
        if waited >= self.persistor_timeout_s:
            if loading:
                return self._end(FAILED, f"the persistor sent no model within {self.persistor_timeout_s:g} s "
                                         f"(model.load was sent again after {self.persistor_retry_s:g} s); "
                                         "is the persistor running?", now)
            return self._end(FAILED, f"round {self.round}: the persistor did not confirm the final model within "
                                     f"{self.persistor_timeout_s:g} s (sent again as a whole model.save after "
                                     f"{self.persistor_retry_s:g} s); is the persistor running?", now)
        if waited < self.persistor_retry_s or self._retried:
            return []
        self._retried = True
        log.warning("job %s: no %s from the persistor after %g s: sending %s again", self.job_id,
                    "model.loaded" if loading else "model.saved", waited,
                    "model.load" if loading else "the final model")
        if loading:
            return [LoadModel(self._load_request())]
        return [Persist(self._final_save_again())]

    def _tick_refused_save(self, trouble: PersistorTrouble, now: float) -> Effects:
        """SAVING while the persistor retries a save its disk refuses: the final model sent again would only
        queue behind it. The persistor gives up by itself; this limit counts from its last word (it
        reports every few seconds), in case it died meanwhile."""
        silent = now - max(self.phase_since, trouble.heard_at)
        if silent < self.persistor_timeout_s:
            return []
        return self._end(FAILED, f"round {self.round}: the persistor did not confirm the final model and has said "
                                 f"nothing for {silent:.0f} s since: {trouble.error}", now)

    # --- rounds ------------------------------------------------------------------------------

    def _open_round(self, now: float) -> Effects:
        r = self.round
        assert r is not None
        targets = sorted(s for s in self._alive if self.spec.site_allowed(s))
        if len(targets) < self.sag.min_clients:
            return self._wait_for_sites(r, targets, now)
        task_id = uuid.uuid4().hex
        opening = self._round_open(r, task_id, targets)
        self._round = _Round(self.sag, r, task_id, tuple(targets), now, opening)
        self.record = RoundRecord(r, task_id, list(targets), self._wall(now))
        self._enter(Phase.TRAINING, now)
        out: Effects = [OpenRound(opening)]  # rule 1: round.open before the task
        prev, holders = self._forwarded
        self._forwarded = ("", frozenset())
        by_ref = tuple(t for t in targets if t in holders)
        whole_to = tuple(t for t in targets if t not in holders)
        if by_ref:  # these sites have the model in their queue already: the task only names it
            out.append(SendTask(by_ref, self._task(DXO(WEIGHTS, {}, self._task_meta()), prev), self._ttl(),
                                transient=True))
        if whole_to:
            out.append(self._whole_task(whole_to))
        log.info("Round %d of job %s started: task %s sent to %s%s", r, self.job_id, self.sag.train_task_name,
                 ", ".join(targets), f" (model forwarded with the aggregate to {', '.join(by_ref)})" if by_ref else "")
        return out

    def _wait_for_sites(self, r: int, targets: list[str], now: float) -> Effects:
        if self.phase != Phase.WAITING:
            self._enter(Phase.WAITING, now)
            log.info("round %d of job %s waits for sites: %d of min_clients=%d alive", r, self.job_id,
                     len(targets), self.sag.min_clients)
        elif now - self.phase_since > self.schedule_timeout_s:
            return self._end(FAILED, f"round {r}: only {len(targets)} site(s) available "
                                     f"({', '.join(targets) or 'none'}) for {self.schedule_timeout_s:g} s, "
                                     f"ScatterAndGather min_clients={self.sag.min_clients}", now)
        return []

    def _round_open(self, r: int, task_id: str, targets: list[str]) -> RoundOpen:
        """round.open, with the plan: persist (route the aggregate to the persistor), forward (to the
        sites), commits (the held aggregate this round builds on)."""
        agg, w = self.spec.aggregator, self.weights
        # an aggregate of WEIGHTS over every variable is the next global model
        whole = agg.expected_data_kind == WEIGHTS and not agg.exclude_vars
        persist = self.spec.persistor is not None and should_persist(self.sag, r) and whole
        # a large model that the aggregate will replace whole goes to the sites with the aggregate itself
        # (one trip through the broker instead of two: aggregator -> server, then server -> sites)
        forward = whole and r < self.last_round and self._model_bytes() >= self.forward_min_bytes
        return RoundOpen(
            self.job_id, r, task_id, list(targets), agg.expected_data_kind, dict(agg.aggregation_weights),
            {k: v.dtype.str for k, v in w.items()}, {k: list(v.shape) for k, v in w.items()},
            agg.exclude_vars, agg.weigh_by_local_iter, persist, forward,
            self._uncommitted[1] if self._uncommitted else "",
            collection_kinds={k: c.kind for k, c in agg.collection.items()},
            collection_weights={k: dict(c.aggregation_weights) for k, c in agg.collection.items()},
            collection_exclude_vars={k: c.exclude_vars for k, c in agg.collection.items()},
        )

    def _close_round(self, reason: str, now: float) -> Effects:
        rnd, rec = self._round, self.record
        assert rnd is not None and rec is not None
        rec.close_reason = reason
        self._enter(Phase.AGGREGATING, now)
        rnd.closing = RoundClose(self.job_id, rnd.number, reason, rnd.accepted())
        log.info("round %d of job %s closing: %s", rnd.number, self.job_id, reason)
        return [CloseRound(rnd.closing)]

    def _record_close(self, rec: RoundRecord, accepted: list[str], now: float,
                      metrics: Mapping[str, dict[str, float]] | None = None) -> None:
        rec.aggregated = list(accepted)
        if metrics:
            rec.metrics = {site: dict(m) for site, m in metrics.items()}
        # verdicts are advisory and may trail the aggregate: the aggregate's list is the truth
        rec.accepted += [x for x in accepted if x not in rec.accepted]
        rec.closed_at = self._wall(now)
        rec.seconds = round(rec.closed_at - rec.started_at, 4)

    def _persist_and_advance(self, m: RoundAggregated, held: bool, now: float) -> Effects:
        """Save the round's model if due, and open the next round, in the protocol's order.

        held: the persistor got this round's aggregate too (round.open said persist) and it is the
        model now, so a small model.commit saves it; otherwise the model goes whole in model.save."""
        p = self.spec.persistor
        if p is None or not should_persist(self.sag, m.round):
            return self._advance(now)
        held = held and self._round is not None and self._round.opening.persist
        final = m.round == self.last_round
        if (held and not final and now - self._committed_at < COMMIT_EVERY_S
                and self._model_bytes() < IMPLIED_COMMIT_MAX_BYTES):
            self._uncommitted = (m.round, m.task_id)  # the next round's round.open commits it
            return self._advance(now)
        out: Effects = []
        save: ModelCommit | ModelSave
        if held:
            self._uncommitted = None
            save = ModelCommit(self.job_id, m.round, m.task_id, p.model_dir, p.model_name, self._history_to_send(),
                               final)
        else:
            out += self._commit_held(now)  # rule 4: before a whole model.save
            save = ModelSave(self.job_id, m.round, DXO(WEIGHTS, self.weights), p.model_dir, p.model_name,
                             self._history_to_send(), final)
        self._committed_at = now
        if final:  # rule 6: the job ends once its model is on disk
            self._final = save
            self._enter(Phase.SAVING, now)
            return [*out, Persist(save)]
        # Other rounds do not wait for the disk: the persistor saves in order meanwhile, and a restarted
        # server resumes from whatever round was saved last.
        if isinstance(save, ModelCommit):
            return [*out, Persist(save), *self._advance(now)]  # rule 2: a commit before the next task
        return [*out, *self._advance(now), Persist(save)]  # rule 3: a whole save after it

    def _advance(self, now: float) -> Effects:
        assert self.round is not None
        if self.history and self.history[-1].round == self.round:
            self.history[-1].done_at = self._wall(now)  # aggregated, applied and (if due) saved
            self._touched(len(self.history) - 1)
        self.round += 1
        if self.round > self.last_round:
            return self._end(FINISHED, "", now)
        return self._open_round(now)

    def _end(self, status: str, reason: str, now: float) -> Effects:
        """The job ends: record the open round, stop the sites' work, commit what the persistor holds."""
        rec = self.record
        if rec is not None:
            rec.close_reason = rec.close_reason or f"job {status}"
            self.history.append(rec)
            self.record = None
        self._enter(Phase.DONE, now)
        out: Effects = []
        if status != FINISHED and self.targets:
            out.append(ControlSites(self.targets, Control("abort", self.job_id)))
        # the last applied round gets saved (the job's end lets the persistor drop what it holds); the
        # job event then follows on the same channel (rule 5)
        commit = self._commit_held(now)
        return [*out, *commit, EndJob(status, reason, ordered=bool(commit))]

    def _commit_held(self, now: float) -> Effects:
        """model.commit for the aggregate the persistor holds uncommitted, if any."""
        p = self.spec.persistor
        if self._uncommitted is None or p is None:
            return []
        (rnd, task_id), self._uncommitted = self._uncommitted, None
        self._committed_at = now
        return [Persist(ModelCommit(self.job_id, rnd, task_id, p.model_dir, p.model_name, self._history_to_send()))]

    # --- messages ----------------------------------------------------------------------------

    def _load_request(self) -> ModelLoad:
        p = self.spec.persistor
        if p is None:
            return ModelLoad(self.job_id)
        return ModelLoad(self.job_id, p.model_dir, p.model_name, p.model, p.source_ckpt_file_full_name)

    def _final_save_again(self) -> ModelSave:
        """The final round's model whole, whatever went first: it needs no held aggregate."""
        first = self._final
        assert first is not None and self.round is not None
        return ModelSave(self.job_id, self.round, DXO(WEIGHTS, self.weights), first.model_dir, first.model_name,
                         first.history, True)

    def _task_meta(self) -> dict[str, Any]:
        return {"current_round": self.round, "num_rounds": self.sag.num_rounds}

    def _task(self, dxo: DXO, model_from: str = "") -> TrainTask:
        rnd = self._round
        assert rnd is not None
        sag = self.sag
        return TrainTask(self.job_id, rnd.number, sag.num_rounds, sag.start_round, sag.train_task_name, rnd.task_id,
                         list(rnd.targets), dxo, self.spec.deploy_map, self.apps, model_from)

    def _whole_task(self, sites: tuple[str, ...]) -> SendTask:
        dxo = self.generator.learnable_to_shareable(self.weights, self._task_meta())
        return SendTask(sites, self._task(dxo), self._ttl(), transient=True)

    def _ttl(self) -> float | None:
        return self.sag.train_timeout or None

    def _history_to_send(self) -> list[dict[str, Any]]:
        """Round records the persistor has not been sent yet."""
        out = [h.to_dict() for h in self.history[self._history_sent:]]
        self._history_sent = len(self.history)
        return out

    # --- helpers -----------------------------------------------------------------------------

    def _enter(self, phase: Phase, now: float) -> None:
        self.phase, self.phase_since = phase, now
        self._retried = False

    def _wall(self, now: float) -> float:
        return now + self.wall_offset

    def _model_bytes(self) -> int:
        return sum(v.nbytes for v in self.weights.values())
