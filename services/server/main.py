"""The server service: queues jobs, drives ScatterAndGather rounds, answers the admin CLI."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sagmq.job.spec import JobSpec, parse_job
from sagmq.runtime.lifecycle import serve
from sagmq.server.generator import apply_aggregate
from sagmq.server.workflow import RoundMachine, should_persist
from sagmq.storage.files import atomic_write
from sagmq.wire.bus import Bus, Delivery
from sagmq.wire.codec import DXO, WEIGHTS, pack, unpack
from sagmq.wire.errors import JobSpecError, Rejected, SagmqError
from sagmq.wire.messages import (
    ABORTED,
    FAILED,
    FINISHED,
    RUNNING,
    SUBMITTED,
    AdminReply,
    AdminRequest,
    ClientHeartbeat,
    Contribution,
    Control,
    JobEvent,
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
from sagmq.wire.settings import Settings
from sagmq.wire.topology import (
    RK_MODEL_COMMIT,
    RK_MODEL_LOAD,
    RK_MODEL_SAVE,
    RK_ROUND_CLOSE,
    RK_ROUND_OPEN,
    rk_control,
    rk_job,
)

log = logging.getLogger(__name__)
ENDED = (FINISHED, FAILED, ABORTED)
# A round whose aggregate is the new model and below this size is committed by the next round's
# opening (RoundOpen.commits) instead of a model.commit of its own, unless none went for this long
IMPLIED_COMMIT_MAX_BYTES = 1 << 20
COMMIT_EVERY_S = 1.0


@dataclass(slots=True)
class Site:
    """A site the server has heard from."""

    name: str
    last_seen: float
    host: str
    pid: int
    allow_custom_code: bool
    busy_job: str = ""
    busy_round: int = -1


@dataclass(slots=True)
class Job:
    """A submitted job and what happened to it (persisted in jobs.json)."""

    job_id: str
    name: str
    status: str
    submitted_at: float
    reason: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    current_round: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in
                ("job_id", "name", "status", "reason", "submitted_at", "started_at", "finished_at", "current_round")}


@dataclass(slots=True)
class Run:
    """The running job's live state (rebuilt from the persistor after a restart)."""

    job: Job
    spec: JobSpec
    phase: str = "loading"  # loading -> training -> aggregating -> (saving) -> training ... -> done
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    machine: RoundMachine | None = None
    record: dict[str, Any] = field(default_factory=dict)
    task_id: str = ""
    phase_since: float = 0.0
    round_open: RoundOpen | None = None
    round_close: RoundClose | None = None
    history_sent: int = 0  # job.history[:history_sent] went to the persistor already
    # (task id, sites): the aggregate of that task, which is the model now, sits in these sites' queues
    forwarded: tuple[str, frozenset[str]] = ("", frozenset())
    resent: dict[str, float] = field(default_factory=dict)  # site -> when it last got the whole task again
    # (round, task id): an aggregate that is the model now, which the persistor holds uncommitted; the
    # next round's opening commits it (RoundOpen.commits), or a model.commit if the job ends first
    uncommitted: tuple[int, str] | None = None
    committed_at: float = -1e9  # when the last model.commit or model.save went


class ServerService:
    """The job queue and round loop; reacts to events, never calls other services."""

    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.s = settings
        self.bus = bus
        self.names = bus.names
        self.stop = threading.Event()
        self.dir = settings.workspace / "server"
        self.jobs: dict[str, Job] = {}
        self._specs: dict[str, JobSpec] = {}
        self.sites: dict[str, Site] = {}
        self.run_: Run | None = None
        self._state_saved_at = 0.0
        self._waiting_logged = 0.0
        bus.on_reconnect.append(self.on_reconnect)
        self._load_state()

    # --- state on disk ----------------------------------------------------------------

    def _jobs_file(self) -> Path:
        return self.dir / "jobs.json"

    def _job_files(self, job_id: str) -> Path:
        return self.dir / "jobs" / job_id / "job.msgpack"

    def _load_state(self) -> None:
        p = self._jobs_file()
        if p.exists():
            for d in json.loads(p.read_text()):
                job = Job(**d)
                self.jobs[job.job_id] = job
            log.info("loaded %d job(s) from %s", len(self.jobs), p)

    def _save_state(self, sync: bool = True) -> None:
        data = [{f: getattr(j, f) for f in Job.__dataclass_fields__} for j in self.jobs.values()]
        atomic_write(self._jobs_file(), json.dumps(data, separators=(",", ":")).encode(), sync=sync)
        self._state_saved_at = time.monotonic()

    def _spec(self, job_id: str) -> JobSpec:
        """A job's parsed spec, read from disk once (a queued job is looked at every tick)."""
        spec = self._specs.get(job_id)
        if spec is None:
            spec = self._specs[job_id] = parse_job(unpack(self._job_files(job_id).read_bytes(), 2**31))
        return spec

    # --- loop -------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until stopped; resume a job that was running when the server stopped."""
        n = self.names
        self.bus.consume(n.server_queue, self.on_event, prefetch=0)  # aggregates come in held parts
        self.bus.consume(n.server_admin_queue, self.on_admin, prefetch=1)
        for job in sorted(self.jobs.values(), key=lambda j: j.submitted_at):
            if job.status == RUNNING:
                log.info("resuming job %s from its last saved round", job.job_id)
                self._start(job, resumed=True)
                break
        log.info("server ready")
        self.bus.run(self.stop, self.tick, 0.05)

    def alive(self, now: float | None = None) -> set[str]:
        """Sites heard from within client_timeout_s."""
        now = time.monotonic() if now is None else now
        return {s.name for s in self.sites.values() if now - s.last_seen <= self.s.client_timeout_s}

    def tick(self) -> None:
        """Schedule queued jobs and close rounds whose time has come."""
        now = time.monotonic()
        run = self.run_
        if run is None:
            self._schedule(now)
        elif run.phase == "training" and run.machine is not None:
            reason = run.machine.close_reason(now, self.alive(now))
            if reason is not None:
                self._close_round(run, reason)
        elif run.phase == "waiting":
            self._open_round(run)
        elif run.phase == "aggregating" and now - run.phase_since > 5.0:
            log.warning("no aggregate of round %s of job %s yet: sending round.close again",
                        run.job.current_round, run.job.job_id)
            run.phase_since = now
            self._send_round_control(run, close_only=True)

    def _eligible(self, spec: JobSpec, now: float) -> list[str]:
        return sorted(s for s in self.alive(now) if spec.site_allowed(s))

    def _schedule(self, now: float) -> None:
        queued = [j for j in self.jobs.values() if j.status == SUBMITTED]
        if not queued:
            return
        job = min(queued, key=lambda j: j.submitted_at)
        spec = self._spec(job.job_id)
        sites = self._eligible(spec, now)
        if len(sites) >= spec.min_clients:
            self._start(job)
            return
        waited = time.time() - job.submitted_at
        if waited > self.s.schedule_timeout_s:
            self._end(job, FAILED, f"only {len(sites)} site(s) connected ({', '.join(sites) or 'none'}); "
                                   f"the job needs min_clients={spec.min_clients}; "
                                   f"waited {self.s.schedule_timeout_s:g} s")
        elif now - self._waiting_logged > 5:
            self._waiting_logged = now
            log.info("job %s waits for sites: %d of %d connected", job.job_id, len(sites), spec.min_clients)

    # --- job lifecycle ----------------------------------------------------------------

    def _publish_job_event(self, job: Job, spec: JobSpec | None = None, ordered: bool = False) -> None:
        meta = {"submitted_at": job.submitted_at, "started_at": job.started_at, "finished_at": job.finished_at}
        if spec is not None:
            meta.update({"deploy_map": spec.deploy_map, "min_clients": spec.min_clients,
                         "num_rounds": spec.sag.num_rounds, "start_round": spec.sag.start_round})
        ev = JobEvent(job.job_id, job.name, job.status, job.reason, meta, job.history)
        if ordered:  # behind a send (a model.commit), on the same channel
            self.bus.send(self.names.events, rk_job(job.status), ev, headers={"job_id": job.job_id})
        else:
            self.bus.publish(self.names.events, rk_job(job.status), ev, headers={"job_id": job.job_id})

    def _start(self, job: Job, resumed: bool = False) -> None:
        spec = self._spec(job.job_id)
        job.status = RUNNING
        if not resumed:
            job.started_at = time.time()
        self.run_ = Run(job, spec, phase_since=time.monotonic())
        self._save_state()
        self._publish_job_event(job, spec)
        p = spec.persistor
        load = (ModelLoad(job.job_id, p.model_dir, p.model_name, p.model, p.source_ckpt_file_full_name)
                if p else ModelLoad(job.job_id))
        self.bus.publish(self.names.events, RK_MODEL_LOAD, load, headers={"job_id": job.job_id})
        log.info("job %s (%s) started%s", job.job_id, job.name, " again after a restart" if resumed else "")

    def _end(self, job: Job, status: str, reason: str = "") -> None:
        run = self.run_
        job.status = status
        job.reason = reason
        job.finished_at = time.time()
        if run is not None and run.job is job:
            if run.record and run.record not in job.history:
                run.record["close_reason"] = run.record.get("close_reason") or f"job {status}"
                job.history.append(run.record)
            targets = run.machine.targets if run.machine else ()
            self.run_ = None
            if status != FINISHED and targets:
                self._to_sites(list(targets), Control("abort", job.job_id))
            # the last applied round gets saved (the job's end lets the persistor drop what it holds); the
            # event then follows on the same channel, so it comes after the commit
            ordered = self._commit_held(run)
        else:
            ordered = False
        self._save_state()
        self._publish_job_event(job, ordered=ordered)
        log_fn = log.info if status == FINISHED else log.warning
        log_fn("job %s %s%s", job.job_id, status, f": {reason}" if reason else "")

    def _to_sites(self, sites: list[str], msg: Any) -> None:
        """One publish fanned out by the broker to the sites' queues (CC)."""
        if not sites:
            return
        try:
            self.bus.publish(self.names.tasks, sites[0], msg, cc=sites[1:],
                             headers={"job_id": getattr(msg, "job_id", "")})
        except SagmqError as e:
            log.warning("could not reach sites %s: %s", sites, e)

    # --- rounds -----------------------------------------------------------------------

    def _open_round(self, run: Run) -> None:
        job, spec, sag = run.job, run.spec, run.spec.sag
        r = job.current_round
        assert r is not None
        now = time.monotonic()
        targets = self._eligible(spec, now)
        if len(targets) < sag.min_clients:
            if run.phase != "waiting":
                run.phase, run.phase_since = "waiting", now
                log.info("round %d of job %s waits for sites: %d of min_clients=%d alive", r, job.job_id,
                         len(targets), sag.min_clients)
            elif now - run.phase_since > self.s.schedule_timeout_s:
                self._end(job, FAILED, f"round {r}: only {len(targets)} site(s) available "
                                       f"({', '.join(targets) or 'none'}) for {self.s.schedule_timeout_s:g} s, "
                                       f"ScatterAndGather min_clients={sag.min_clients}")
            return
        run.task_id = uuid.uuid4().hex
        run.machine = RoundMachine(sag, r, tuple(targets), now)
        run.record = {"round": r, "task_id": run.task_id, "targets": targets, "accepted": [], "rejected": [],
                      "started_at": time.time()}
        run.phase, run.phase_since = "training", now
        agg = spec.aggregator
        w = run.weights
        # an aggregate of WEIGHTS over every variable is the next global model: the persistor takes it
        # straight from the aggregator (the server then only confirms it with model.commit)
        whole = agg.expected_data_kind == WEIGHTS and not agg.exclude_vars
        persist = spec.persistor is not None and should_persist(sag, r) and whole
        # a large model that the aggregate will replace whole goes to the sites with the aggregate itself
        # (one trip through the broker instead of two: aggregator -> server, then server -> sites)
        forward = (whole and r < sag.start_round + sag.num_rounds - 1
                   and sum(v.nbytes for v in w.values()) >= self.s.forward_min_bytes)
        run.round_open = RoundOpen(
            job.job_id, r, run.task_id, targets, agg.expected_data_kind, agg.aggregation_weights,
            {k: v.dtype.str for k, v in w.items()}, {k: list(v.shape) for k, v in w.items()},
            agg.exclude_vars, agg.weigh_by_local_iter, persist, forward,
            run.uncommitted[1] if run.uncommitted else "",
        )
        run.round_close = None
        run.resent = {}
        self._send_round_control(run)
        prev, holders = run.forwarded
        run.forwarded = ("", frozenset())
        by_ref = [t for t in targets if t in holders]
        whole_to = [t for t in targets if t not in holders]
        if by_ref:  # these sites have the model in their queue already: the task only names it
            self._send_task(run, by_ref, DXO(WEIGHTS, {}, self._task_meta(run)), prev)
        if whole_to:
            self._send_task(run, whole_to, DXO(WEIGHTS, w, self._task_meta(run)))
        log.info("Round %d of job %s started: task %s sent to %s%s", r, job.job_id, sag.train_task_name,
                 ", ".join(targets), f" (model forwarded with the aggregate to {', '.join(by_ref)})" if by_ref else "")

    @staticmethod
    def _task_meta(run: Run) -> dict[str, Any]:
        return {"current_round": run.job.current_round, "num_rounds": run.spec.sag.num_rounds}

    def _send_task(self, run: Run, sites: list[str], dxo: DXO, model_from: str = "") -> None:
        """The round's task to these sites, one publish fanned out by the broker (CC)."""
        job, spec, sag = run.job, run.spec, run.spec.sag
        r = job.current_round
        assert r is not None and run.machine is not None
        task = TrainTask(job.job_id, r, sag.num_rounds, sag.start_round, sag.train_task_name, run.task_id,
                         list(run.machine.targets), dxo, spec.deploy_map, spec.client_apps(), model_from)
        # not waiting for the broker: the loop keeps serving while a large task leaves
        self.bus.send(self.names.tasks, sites[0], task, cc=sites[1:], headers={"job_id": job.job_id, "round": r},
                      expiration_s=sag.train_timeout or None, on_done=self._task_sent(job.job_id, r, sites))

    def on_missing_model(self, site: str, task_id: str) -> None:
        """A site got a task naming a forwarded model it does not have: send it the whole task."""
        run = self.run_
        if (run is None or run.phase != "training" or task_id != run.task_id or run.machine is None
                or site not in run.machine.targets or site in run.record.get("accepted", ())):
            return
        now = time.monotonic()
        if now - run.resent.get(site, -1e9) < max(2.0, 2 * self.s.heartbeat_s):
            return  # sent just now; it is on its way
        run.resent[site] = now
        log.info("site %s lacks the forwarded model of round %s of job %s: sending it the whole task", site,
                 run.job.current_round, run.job.job_id)
        self._send_task(run, [site], DXO(WEIGHTS, run.weights, self._task_meta(run)))

    def _task_sent(self, job_id: str, r: int, targets: list[str]) -> Callable[[SagmqError | None], None]:
        def done(err: SagmqError | None) -> None:
            if err is not None:  # the round's machine fails or closes it as sites stay silent
                log.error("task of round %d of job %s did not reach %s: %s", r, job_id, ", ".join(targets), err)
        return done

    def _close_round(self, run: Run, reason: str) -> None:
        r = run.job.current_round
        assert r is not None
        run.record["close_reason"] = reason
        run.phase, run.phase_since = "aggregating", time.monotonic()
        expected = run.machine.accepted() if run.machine else []
        run.round_close = RoundClose(run.job.job_id, r, reason, expected)
        self._send_round_control(run, close_only=True)
        log.info("round %d of job %s closing: %s", r, run.job.job_id, reason)

    def _send_round_control(self, run: Run, close_only: bool = False) -> None:
        """round.open / round.close to the aggregator, advisory: they wait for neither disk nor
        confirm. They survive an aggregator crash in its queue; the aggregator holds results that
        overtake their round.open; after a broker restart (which drops them) the server sends them
        again, and a round.close with no aggregate after a while is sent again too."""
        h = {"job_id": run.job.job_id, "round": run.job.current_round}
        if run.round_open is not None and not close_only:
            self.bus.publish(self.names.events, RK_ROUND_OPEN, run.round_open, headers=h, advisory=True)
        if run.round_close is not None:
            self.bus.publish(self.names.events, RK_ROUND_CLOSE, run.round_close, headers=h, advisory=True)

    def on_reconnect(self) -> None:
        """The broker may have restarted: sites get a fresh grace period (the server could not hear
        their heartbeats while it was away), and the aggregator gets the open round again."""
        now = time.monotonic()
        for site in self.sites.values():
            site.last_seen = max(site.last_seen, now)
        run = self.run_
        if run is not None and run.phase in ("training", "aggregating"):
            log.info("reconnected: sending round %s of job %s to the aggregator again", run.job.current_round,
                     run.job.job_id)
            self._send_round_control(run)

    def _advance(self, run: Run) -> None:
        job = run.job
        assert job.current_round is not None
        if job.history and job.history[-1]["round"] == job.current_round:
            job.history[-1]["done_at"] = time.time()  # aggregated, applied and (if due) saved
        job.current_round += 1
        if job.current_round >= run.spec.sag.start_round + run.spec.sag.num_rounds:
            run.phase = "done"
            self._end(job, FINISHED)  # (saves the state)
        else:
            self._open_round(run)
            # at most once a second and without fsync (a round can take a few ms): a restart resumes
            # from the persistor's last saved round whatever jobs.json says; job starts and ends are
            # written at once and durably
            if time.monotonic() - self._state_saved_at >= 1.0:
                self._save_state(sync=False)

    # --- events -----------------------------------------------------------------------

    def on_event(self, d: Delivery) -> None:
        """Heartbeats, contributions, aggregates, model loaded/saved."""
        limit = self.s.max_body_bytes
        t = d.msg_type
        if t == ClientHeartbeat.TYPE:
            hb = d.message(ClientHeartbeat, limit)
            if d.user_id != self.s.amqp_user and d.user_id != hb.site:
                raise Rejected(f"spoofed sender: user {d.user_id!r} sent a heartbeat for site {hb.site!r}")
            self.on_heartbeat(hb)
            if hb.missing_model:
                self.on_missing_model(hb.site, hb.missing_model)
            return
        handlers = {
            Contribution.TYPE: (Contribution, self.on_contribution),
            RoundAggregated.TYPE: (RoundAggregated, self.on_aggregated),
            ModelLoaded.TYPE: (ModelLoaded, self.on_loaded),
            ModelSaved.TYPE: (ModelSaved, self.on_saved),
        }
        if t not in handlers:
            raise Rejected(f"the server queue does not take {t!r} messages")
        cls, fn = handlers[t]
        if t == RoundAggregated.TYPE and d.user_id not in (self.s.amqp_user, self.s.aggregator_user):
            raise Rejected(f"spoofed sender: user {d.user_id!r} sent an aggregate (only the aggregator's user "
                           f"{self.s.aggregator_user!r} may)")
        msg = d.message(cls, limit)
        run = self.run_
        if run is None or run.job.job_id != msg.job_id:  # type: ignore[attr-defined]
            log.info("ignoring %s for job %s, which is not running", t, msg.job_id)  # type: ignore[attr-defined]
            return
        fn(run, msg)  # type: ignore[operator]

    def on_heartbeat(self, hb: ClientHeartbeat) -> None:
        known = hb.site in self.sites
        self.sites[hb.site] = Site(hb.site, time.monotonic(), hb.host, hb.pid, hb.allow_custom_code,
                                   hb.busy_job, hb.busy_round)
        if hb.hello or not known:
            log.info("site %s connected (host %s, pid %d)", hb.site, hb.host, hb.pid)

    def on_contribution(self, run: Run, c: Contribution) -> None:
        if (run.phase != "training" or c.round != run.job.current_round or run.machine is None
                or (c.task_id and c.task_id != run.task_id)):
            log.info("late verdict on %s for round %d of job %s: %s", c.site, c.round, c.job_id,
                     "accepted" if c.accepted else c.reason)
            return
        if c.accepted:
            if c.site in run.record["accepted"]:
                return  # the aggregator re-accepted a redelivered result after a restart
            run.record["accepted"].append(c.site)
            log.info("Contribution from %s ACCEPTED at round %d", c.site, c.round)
        else:
            entry = {"site": c.site, "rc": c.rc, "reason": c.reason}
            if entry not in run.record["rejected"]:
                run.record["rejected"].append(entry)
            log.warning("Contribution from %s REJECTED at round %d: %s", c.site, c.round, c.reason)
        if c.rc == "UNSAFE_JOB":
            self._end(run.job, FAILED, f"site {c.site} refused the job: {c.reason}")
            return
        now = time.monotonic()
        fail = run.machine.on_contribution(c.site, c.accepted, c.rc, now)
        if fail is not None:
            self._end(run.job, FAILED, fail)
            return
        reason = run.machine.close_reason(now, self.alive(now))
        if reason is not None and not run.machine.all_answered():  # all answered: the aggregator closes it
            self._close_round(run, reason)

    def on_aggregated(self, run: Run, m: RoundAggregated) -> None:
        job, sag = run.job, run.spec.sag
        if run.phase not in ("training", "aggregating") or m.round != job.current_round:
            log.info("ignoring aggregate of round %d of job %s (phase %s)", m.round, m.job_id, run.phase)
            return
        if run.phase == "training":  # the aggregator closed it: every target had answered
            run.record["close_reason"] = f"all {len(run.record['targets'])} targets answered"
        run.record["aggregated"] = list(m.accepted)
        # verdicts are advisory and may trail the aggregate: the aggregate's list is the truth
        run.record["accepted"] += [x for x in m.accepted if x not in run.record["accepted"]]
        run.record["closed_at"] = time.time()
        run.record["seconds"] = round(run.record["closed_at"] - run.record["started_at"], 4)
        if len(m.accepted) < sag.min_clients:
            rejected = "; ".join(f"{x['site']}: {x['reason']}" for x in run.record["rejected"]) or "none"
            self._end(job, FAILED, f"round {m.round} ended with {len(m.accepted)} accepted result(s), fewer than "
                                   f"min_clients={sag.min_clients} ({run.record['close_reason']}; rejected: {rejected})")
            return
        try:
            run.weights = apply_aggregate(run.weights, m.dxo)
        except SagmqError as e:
            self._end(job, FAILED, f"round {m.round}: {e}")
            return
        same = m.dxo is not None and m.dxo.kind == WEIGHTS and set(m.dxo.data) == set(run.weights)
        if run.round_open is not None and run.round_open.forward and m.task_id == run.task_id and same:
            run.forwarded = (m.task_id, frozenset(m.accepted))  # the aggregator sent them this model
        job.history.append(run.record)
        run.record = {}
        log.info("Round %d of job %s finished with %d contribution(s)", m.round, job.job_id, len(m.accepted))
        p = run.spec.persistor
        if p is None or not should_persist(sag, m.round):
            self._advance(run)
            return
        final = m.round == sag.start_round + sag.num_rounds - 1
        headers = {"job_id": job.job_id, "round": m.round}
        if run.round_open is not None and run.round_open.persist and m.task_id == run.task_id and same:
            # The new global model is the aggregate, which the persistor got too and holds. A small one
            # needs no model.commit of its own: the next round's opening names it (RoundOpen.commits), so
            # that round's aggregate commits it. A commit still goes for the last round, for a large model
            # (the persistor would otherwise hold two), and once a second with the rounds' history.
            # It goes before the next task, so it reaches the persistor ahead of the next aggregate.
            if (not final and time.monotonic() - run.committed_at < COMMIT_EVERY_S
                    and sum(v.nbytes for v in run.weights.values()) < IMPLIED_COMMIT_MAX_BYTES):
                run.uncommitted = (m.round, m.task_id)
                self._advance(run)
                return
            run.uncommitted = None
            save: ModelSave | ModelCommit = ModelCommit(job.job_id, m.round, m.task_id, p.model_dir, p.model_name,
                                                        self._history_to_send(run), final)
            rk = RK_MODEL_COMMIT
        else:
            self._commit_held(run)  # a whole model.save lets the persistor drop what it holds
            save = ModelSave(job.job_id, m.round, DXO(WEIGHTS, run.weights), p.model_dir, p.model_name,
                             self._history_to_send(run), final)
            rk = RK_MODEL_SAVE
        run.committed_at = time.monotonic()
        if final:
            run.phase, run.phase_since = "saving", time.monotonic()  # the job ends once its model is on disk

            def saved_or_not(err: SagmqError | None) -> None:
                if err is not None and run.phase == "saving" and self.run_ is run:
                    self._end(job, FAILED, f"round {m.round}: the final model could not be sent to the persistor: {err}")

            self.bus.send(self.names.events, rk, save, headers=headers, on_done=saved_or_not)
            return
        # Other rounds do not wait for the disk: the persistor saves in order meanwhile, and a restarted
        # server resumes from whatever round was saved last. A small model.commit goes before the next
        # task, so it reaches the persistor ahead of the next round's aggregate (which replaces a held
        # one: a commit behind it would find nothing to save); a whole model in model.save goes after it.
        if isinstance(save, ModelCommit):
            self.bus.send(self.names.events, rk, save, headers=headers)
            self._advance(run)
        else:
            self._advance(run)
            self.bus.send(self.names.events, rk, save, headers=headers)

    @staticmethod
    def _history_to_send(run: Run) -> list[dict[str, Any]]:
        history = run.job.history[run.history_sent:]
        run.history_sent = len(run.job.history)
        return history

    def _commit_held(self, run: Run) -> bool:
        """model.commit for the aggregate the persistor holds uncommitted, if any (before the job ends or
        a whole model.save, which let the persistor drop it). Sent like the task and the job's events,
        in order on the sending channel."""
        if run.uncommitted is None or run.spec.persistor is None:
            return False
        (rnd, task_id), run.uncommitted = run.uncommitted, None
        p = run.spec.persistor
        commit = ModelCommit(run.job.job_id, rnd, task_id, p.model_dir, p.model_name, self._history_to_send(run))
        self.bus.send(self.names.events, RK_MODEL_COMMIT, commit, headers={"job_id": run.job.job_id, "round": rnd})
        run.committed_at = time.monotonic()
        return True

    def on_loaded(self, run: Run, m: ModelLoaded) -> None:
        if run.phase != "loading":
            return
        if m.error or m.dxo is None:
            self._end(run.job, FAILED, m.error or "the persistor sent no model")
            return
        sag = run.spec.sag
        run.weights = {k: v if v.flags.writeable else np.array(v) for k, v in m.dxo.data.items()}
        resume = m.next_round if m.source == "saved" and m.next_round >= 0 else None
        run.job.current_round = sag.start_round if resume is None else resume
        # rounds after the last saved one will run again: forget what was recorded of them
        run.job.history = [h for h in run.job.history if h["round"] < run.job.current_round]
        log.info("job %s: model loaded from %s; starting at round %d", run.job.job_id, m.source,
                 run.job.current_round)
        if run.job.current_round >= sag.start_round + sag.num_rounds:
            self._end(run.job, FINISHED)
            return
        self._open_round(run)

    def on_saved(self, run: Run, m: ModelSaved) -> None:
        # the persistor confirms the latest of several saved rounds at once (at most one a second)
        now = time.time()
        for h in run.job.history:
            if h["round"] <= m.round and "saved_at" not in h:
                h["saved_at"] = now
        if run.phase == "saving" and m.round == run.job.current_round:
            self._advance(run)

    # --- admin ------------------------------------------------------------------------

    def on_admin(self, d: Delivery) -> None:
        """submit, list, status, abort, shutdown."""
        req = d.message(AdminRequest, self.s.max_body_bytes)
        try:
            reply = self.admin(req)
        except (SagmqError, KeyError, ValueError) as e:
            reply = AdminReply(False, error=str(e))
        self.bus.reply(d, reply)

    def admin(self, req: AdminRequest) -> AdminReply:
        cmd, args = req.command, req.args
        if cmd == "submit":
            try:
                spec = parse_job(req.files)
            except JobSpecError as e:
                return AdminReply(False, error=f"invalid job: {e}")
            job = Job(uuid.uuid4().hex, spec.name, SUBMITTED, time.time())
            p = self._job_files(job.job_id)
            atomic_write(p, pack(req.files))
            self.jobs[job.job_id] = job
            self._save_state()
            self._publish_job_event(job, spec)
            log.info("job %s (%s) submitted", job.job_id, job.name)
            return AdminReply(True, {"job_id": job.job_id})
        if cmd == "list":
            return AdminReply(True, {"jobs": [j.summary() for j in sorted(self.jobs.values(),
                                                                          key=lambda j: j.submitted_at)]})
        if cmd == "status":
            job_id = args.get("job_id")
            if job_id:
                job = self._job(job_id)
                start = args.get("history_from", 0)
                if not isinstance(start, int) or isinstance(start, bool) or start < 0:
                    raise SagmqError(f"status: history_from must be a round record index >= 0, not {start!r}")
                out = {**job.summary(), "history": job.history[start:], "history_from": start}
                if self.run_ and self.run_.job is job:
                    out["phase"] = self.run_.phase
                    out["open_round"] = self.run_.record
                return AdminReply(True, out)
            now = time.monotonic()
            sites = [{"site": s.name, "alive": now - s.last_seen <= self.s.client_timeout_s,
                      "seen_s_ago": round(now - s.last_seen, 2), "host": s.host,
                      "allow_custom_code": s.allow_custom_code, "busy_job": s.busy_job}
                     for s in sorted(self.sites.values(), key=lambda s: s.name)]
            return AdminReply(True, {"sites": sites, "running": self.run_.job.job_id if self.run_ else None,
                                     "queued": [j.job_id for j in self.jobs.values() if j.status == SUBMITTED]})
        if cmd == "abort":
            job = self._job(args.get("job_id", ""))
            if job.status in ENDED:
                return AdminReply(False, error=f"job {job.job_id} already ended ({job.status})")
            self._end(job, ABORTED, "aborted by the admin")
            return AdminReply(True, {"job_id": job.job_id, "status": ABORTED})
        if cmd == "shutdown":
            return self._shutdown(str(args.get("target", "")), str(args.get("site", "")))
        return AdminReply(False, error=f"unknown command {cmd!r}")

    def _job(self, job_id: str) -> Job:
        matches = [j for j in self.jobs.values() if j.job_id.startswith(job_id)] if job_id else []
        if len(matches) != 1:
            raise SagmqError(f"no job {job_id!r}" if not matches else f"job id prefix {job_id!r} is ambiguous")
        return matches[0]

    def _shutdown(self, target: str, site: str) -> AdminReply:
        if target == "client":
            if site not in self.sites:
                return AdminReply(False, error=f"unknown site {site!r}")
            self._to_sites([site], Control("shutdown", target=site))
            return AdminReply(True, {"stopping": [site]})
        if target not in ("all", "server"):
            return AdminReply(False, error="shutdown takes all, server, or client NAME")
        if self.run_ is not None:
            return AdminReply(False, error=f"job {self.run_.job.job_id} is running; abort it first")
        stopping = ["server"]
        if target == "all":
            self.bus.publish(self.names.events, rk_control("all"), Control("shutdown", target="all"))
            sites = sorted(self.alive())
            self._to_sites(sites, Control("shutdown", target="all"))
            stopping += ["aggregator", "persistor", *sites]
        self.stop.set()
        return AdminReply(True, {"stopping": stopping})


def main(argv: list[str] | None = None) -> int:
    """Entry point of `sagmq server`."""
    return serve("server", ServerService, argv)
