"""The server service: queues jobs, hosts each running job's ScatterAndGather, answers the admin CLI.

An adapter: it keeps the job queue (jobs.json) and the site registry (from heartbeats), feeds the
running job's ScatterAndGather (sagmq.server.scatter_and_gather) the messages it receives and a
tick, and carries the effects it returns out on the bus, in their order. The round rules and the
persist / forward / commit plan live in ScatterAndGather, not here.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sagmq.filters.base import TASK_DATA, TASK_RESULT
from sagmq.filters.sides import result_filters_to_wire, server_task_data, server_task_result
from sagmq.job.spec import JobSpec, parse_job
from sagmq.runtime.lifecycle import serve
from sagmq.runtime.metrics import meter_of
from sagmq.server.cross_site_model_eval import CrossSiteModelEval, CSEEffect, SaveCrossVal
from sagmq.server.scatter_and_gather import (
    CloseRound,
    ControlSites,
    Effect,
    EndJob,
    LoadModel,
    OpenRound,
    Persist,
    RoundRecord,
    ScatterAndGather,
    SendTask,
    SiteState,
)
from sagmq.storage.files import atomic_write
from sagmq.wire.bus import Bus, Delivery
from sagmq.wire.codec import pack, unpack
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
    CrossValSave,
    JobEvent,
    Message,
    ModelCommit,
    ModelLoaded,
    ModelSave,
    ModelSaved,
    RoundAggregated,
    TaskResult,
)
from sagmq.wire.settings import Settings
from sagmq.wire.topology import (
    RK_CROSS_VAL_SAVE,
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
# a send to the events exchange that the broker refuses is made again this many times in all (after 0.5, 1,
# 2, 4, then every 5 s: about 25 s, longer than a cluster takes to elect a new queue leader)
SEND_ATTEMPTS = 8
# the messages of the server queue that go to the running job's ScatterAndGather
_JOB_EVENTS: dict[str, type[Message]] = {c.TYPE: c for c in (Contribution, RoundAggregated, ModelLoaded, ModelSaved,
                                                               TaskResult)}


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
    task_id: str = ""  # the last task the site received whole, and its bytes (heartbeat)
    task_bytes: int = 0
    receiving_bytes: int = 0  # of the next one, arriving


@dataclass(slots=True)
class Job:
    """A submitted job and what happened to it (persisted in jobs.json). A running job's history is
    kept by its ScatterAndGather and copied here when the job is saved, shown or ended."""

    job_id: str
    name: str
    status: str
    submitted_at: float
    reason: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    current_round: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    # what CrossSiteModelEval recorded (participants, models, results, failures), if the job has one
    cross_site_eval: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The job without its history (list and status replies)."""
        return {k: getattr(self, k) for k in
                ("job_id", "name", "status", "reason", "submitted_at", "started_at", "finished_at", "current_round")}


@dataclass(slots=True)
class Run:
    """The running job and its rounds."""

    job: Job
    sag: ScatterAndGather
    cse: CrossSiteModelEval | None = None  # cross-site evaluation, once ScatterAndGather finished

    def sync(self) -> None:
        """Copy the rounds' state into the job record (a resumed job keeps its round until the model loads)."""
        if self.sag.round is not None:
            self.job.current_round = self.sag.round
        self.job.history = self.sag.history_dicts()
        if self.cse is not None:
            self.job.cross_site_eval = self.cse.record()


class ServerService:
    """The job queue and the round loop's adapter; reacts to events, never calls other services."""

    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.s = settings
        self.bus = bus
        self.names = bus.names
        self.stop = threading.Event()
        self.dir = settings.workspace / "server"
        self.jobs: dict[str, Job] = {}
        self._specs: dict[str, JobSpec] = {}
        self.sites: dict[str, Site] = {}
        self.site_states: dict[str, SiteState] = {}
        self.model_bytes: dict[str, int] = {}  # job -> array bytes of its last task that carried the model
        self.run_: Run | None = None
        self._later: list[tuple[float, Callable[[], None]]] = []  # (when, send): sends the broker refused
        self._state_saved_at = 0.0
        self._waiting_logged = 0.0
        # rounds, contributions and sites for the Prometheus metrics (runtime.metrics); the sites are read
        # when scraped, from another thread: list() copies them at once
        self.meter = meter_of(bus, "server")
        self.meter.watch_sites(lambda: {s.name: s.last_seen for s in list(self.sites.values())},
                               settings.client_timeout_s)
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
        if self.run_ is not None:
            self.run_.sync()
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
        # A bounded prefetch: the server holds at most this many messages unread or unacked, where prefetch 0
        # let a flood of junk pull the whole backlog into its memory. Parts of a large aggregate or
        # model.loaded stay unacked until the whole is in (their bodies are copied into the assembly and
        # dropped), so the window fits two of the largest (SAGMQ_MAX_MODEL_BYTES / SAGMQ_CHUNK_BYTES parts
        # each: a redelivered aggregate beside a model.loaded after a restart); a smaller window would stall
        # their assembly until SAGMQ_CHUNK_TIMEOUT_S. The 32 more keep heartbeats, contributions and junk
        # (acked as it is handled) flowing past them. In bytes the window holds at most its count times the
        # largest message: SAGMQ_MAX_MODEL_BYTES set near the real model's size keeps that small.
        self.bus.consume(n.server_queue, self.on_event, prefetch=self.s.prefetch_for(blobs=2, slack=32))
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
        """Schedule queued jobs; let the running job's rounds see the time and the sites."""
        now = time.monotonic()
        if self._later:  # sends to make again (see _send_event)
            due = [fn for at, fn in self._later if at <= now]
            self._later = [(at, fn) for at, fn in self._later if at > now]
            for fn in due:
                fn()
        run = self.run_
        if run is None:
            self._schedule(now)
        elif run.cse is not None:
            self._apply(run, run.cse.on_tick(now, self.alive(now)))
        else:
            self._apply(run, run.sag.on_tick(now, self.alive(now), self.site_states))

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
            self._end_queued(job, FAILED, f"only {len(sites)} site(s) connected ({', '.join(sites) or 'none'}); "
                                          f"the job needs min_clients={spec.min_clients}; "
                                          f"waited {self.s.schedule_timeout_s:g} s")
        elif now - self._waiting_logged > 5:
            self._waiting_logged = now
            log.info("job %s waits for sites: %d of %d connected", job.job_id, len(sites), spec.min_clients)

    # --- job lifecycle ----------------------------------------------------------------

    def _publish_job_event(self, job: Job, spec: JobSpec | None = None, ordered: bool = False) -> None:
        """The job's status, meta and, once it ended, its history, for the persistor (which merges the
        history by round). A running job's event carries none: a restarted server's copy lags (jobs.json
        is written at most once a second) and may hold rounds that run again; the whole history goes with
        the first save after its model loads."""
        meta: dict[str, Any] = {"submitted_at": job.submitted_at, "started_at": job.started_at, "finished_at": job.finished_at}
        if spec is not None:
            meta.update({"deploy_map": spec.deploy_map, "min_clients": spec.min_clients,
                         "num_rounds": spec.sag.num_rounds, "start_round": spec.sag.start_round})
        history = job.history if job.status in ENDED else []
        if job.cross_site_eval:  # recorded with the job's meta (meta.json)
            meta["cross_site_eval"] = job.cross_site_eval
        ev = JobEvent(job.job_id, job.name, job.status, job.reason, meta, history)
        if ordered:  # behind a send (a model.commit), on the same channel
            self.bus.send(self.names.events, rk_job(job.status), ev, headers={"job_id": job.job_id})
        else:
            self.bus.publish(self.names.events, rk_job(job.status), ev, headers={"job_id": job.job_id})

    def _start(self, job: Job, resumed: bool = False) -> None:
        spec = self._spec(job.job_id)
        job.status = RUNNING
        if not resumed:
            job.started_at = time.time()
        now = time.monotonic()
        sag = ScatterAndGather(
            job.job_id, spec, heartbeat_s=self.s.heartbeat_s, schedule_timeout_s=self.s.schedule_timeout_s,
            # a forwarded aggregate would reach the sites without the server's task_data_filters
            forward_min_bytes=2**63 if spec.filters.get(TASK_DATA) else self.s.forward_min_bytes,
            wall_offset=time.time() - now, history=[RoundRecord.from_dict(h) for h in job.history],
        )
        run = self.run_ = Run(job, sag)
        self._save_state()
        self._publish_job_event(job, spec)
        self._apply(run, sag.start(now, self.alive(now)))
        log.info("job %s (%s) started%s", job.job_id, job.name, " again after a restart" if resumed else "")

    def _end_queued(self, job: Job, status: str, reason: str) -> None:
        """A job that never ran ends (it waited too long for sites, or the admin aborted it)."""
        self._ended(job, status, reason, ordered=False)

    def _ended(self, job: Job, status: str, reason: str, ordered: bool) -> None:
        job.status = status
        job.reason = reason
        job.finished_at = time.time()
        self._save_state()
        self._publish_job_event(job, ordered=ordered)
        log_fn = log.info if status == FINISHED else log.warning
        log_fn("job %s %s%s", job.job_id, status, f": {reason}" if reason else "")

    # --- effects ----------------------------------------------------------------------

    def _apply(self, run: Run, effects: list[Effect] | list[CSEEffect]) -> None:
        """Carry out the rounds' effects in their order; jobs.json follows a new round at most once a
        second and without fsync (a round can take a few ms): a restart resumes from the persistor's last
        saved round whatever jobs.json says; job starts and ends are written at once and durably."""
        for effect in effects:
            self._carry(run, effect)
        self.meter.follow(run.sag)
        rnd = run.sag.round
        if self.run_ is run and rnd is not None and rnd != run.job.current_round:  # (the job record lags)
            run.job.current_round = rnd
            if time.monotonic() - self._state_saved_at >= 1.0:
                self._save_state(sync=False)

    def _carry(self, run: Run, effect: Effect | SaveCrossVal) -> None:
        job_id = run.job.job_id
        match effect:
            case SendTask():
                self._send_task(effect)
            case Persist(message=msg):
                self._persist(run, msg)
            case OpenRound(message=msg):
                if self._spec(job_id).filters.get(TASK_RESULT):  # the aggregator runs them (sagmq.filters.sides)
                    msg = replace(msg, result_filters=result_filters_to_wire(self._spec(job_id).filters))
                self._send_event(run, RK_ROUND_OPEN, msg, {"job_id": job_id, "round": msg.round})
            case CloseRound(message=msg):
                self._send_event(run, RK_ROUND_CLOSE, msg, {"job_id": job_id, "round": msg.round})
            case LoadModel(message=msg):
                msg = replace(msg, snapshot_every_n_rounds=self._spec(job_id).sag.snapshot_every_n_rounds)
                self.bus.publish(self.names.events, RK_MODEL_LOAD, msg, headers={"job_id": job_id})
            case ControlSites(sites=sites, message=msg):
                self._to_sites(list(sites), msg)
            case SaveCrossVal(message=msg):
                self._save_cross_val(msg)
            case EndJob() if effect.status == FINISHED and run.cse is None and self._spec(job_id).cse is not None:
                self._start_cross_site(run)
            case EndJob(status=status, reason=reason, ordered=ordered):
                run.sync()
                self.run_ = None
                self._ended(run.job, status, reason, ordered)

    def _start_cross_site(self, run: Run) -> None:
        """ScatterAndGather finished: the job's CrossSiteModelEval runs next, in the same job (its server model
        is the final global model, which the persistor has saved by now)."""
        spec = self._spec(run.job.job_id)
        assert spec.cse is not None
        now = time.monotonic()
        run.sync()
        model_bytes = sum(v.nbytes for v in run.sag.weights.values())
        run.cse = CrossSiteModelEval(run.job.job_id, spec, spec.cse, round=run.sag.last_round + 1,
                                     wall_offset=time.time() - now,
                                     submit_one_at_a_time=model_bytes >= self.s.chunk_bytes)
        log.info("job %s: ScatterAndGather finished; CrossSiteModelEval starts", run.job.job_id)
        self._apply(run, run.cse.start(now, self.alive(now), run.sag.weights))

    def _save_cross_val(self, msg: CrossValSave) -> None:
        """A submitted model or the results to the persistor, in order on the sending channel (the job's end
        event follows the results on it)."""
        def done(err: SagmqError | None) -> None:
            if err is not None:
                log.error("cross-site results of job %s did not reach the persistor: %s", msg.job_id, err)
        self.bus.send(self.names.events, RK_CROSS_VAL_SAVE, msg, headers={"job_id": msg.job_id}, on_done=done)

    def _send_task(self, effect: SendTask) -> None:
        """A round's task to its sites, one send fanned out by the broker (CC); the loop does not wait for
        the broker, so it keeps serving while a large task leaves."""
        task, sites = effect.task, list(effect.sites)
        if self._spec(task.job_id).filters.get(TASK_DATA):  # the server's task_data_filters, before it leaves
            filtered = server_task_data(self._spec(task.job_id).filters, task)
            if filtered is None:
                return  # logged; the round's rules close or fail it without these sites
            task = filtered
        if task.dxo.data:  # (a task naming a forwarded model carries none: the last size stands)
            self.model_bytes[task.job_id] = sum(a.nbytes for a in task.dxo.data.values())
        self.bus.send(self.names.tasks, sites[0], task, cc=sites[1:],
                      headers={"job_id": task.job_id, "round": task.round},
                      expiration_s=effect.expiration_s, persistent=not effect.transient,
                      on_done=self._task_sent(task.job_id, task.round, sites))

    @staticmethod
    def _task_sent(job_id: str, r: int, targets: list[str]) -> Callable[[SagmqError | None], None]:
        def done(err: SagmqError | None) -> None:
            if err is not None:  # the round's rules fail or close it as sites stay silent
                log.error("task of round %d of job %s did not reach %s: %s", r, job_id, ", ".join(targets), err)
        return done

    def _persist(self, run: Run, msg: ModelCommit | ModelSave) -> None:
        """model.commit / model.save, sent in order on the sending channel; a final one that cannot be
        sent fails the job."""
        rk = RK_MODEL_COMMIT if isinstance(msg, ModelCommit) else RK_MODEL_SAVE
        on_failed = None
        if msg.final:
            def on_failed(err: SagmqError) -> None:
                self._apply(run, run.sag.on_persist_failed(msg.round, str(err), time.monotonic()))
        self._send_event(run, rk, msg, {"job_id": msg.job_id, "round": msg.round}, on_failed)

    def _send_event(self, run: Run, rk: str, msg: Message, headers: dict[str, Any],
                    on_failed: Callable[[SagmqError], None] | None = None, attempt: int = 0) -> None:
        """A confirmed send to the events exchange, sent again when the broker refuses it (a nack: a quorum
        queue without a leader while a cluster node fails over, say), up to SEND_ATTEMPTS times with backoff,
        while the run is still this server's. A lost connection needs nothing here: the bus sends whatever
        was not confirmed again on the next connection. (round.open and round.close were once advisory,
        fire-and-forget publishes; one dropped while a cluster failed over left the aggregator waiting.)"""
        def done(err: SagmqError | None) -> None:
            if err is None or self.run_ is not run:
                return
            if attempt + 1 < SEND_ATTEMPTS:
                delay = min(5.0, 0.5 * 2**attempt)
                log.warning("%s of job %s: %s; sending it again in %.1f s", msg.TYPE, run.job.job_id, err, delay)
                self._later.append((time.monotonic() + delay, lambda: self._send_event(
                    run, rk, msg, headers, on_failed, attempt + 1)))
            elif on_failed is not None:
                on_failed(err)
        self.bus.send(self.names.events, rk, msg, headers=headers, on_done=done)

    def _to_sites(self, sites: list[str], msg: Control) -> None:
        """One publish fanned out by the broker to the sites' queues (CC)."""
        if not sites:
            return
        try:
            self.bus.publish(self.names.tasks, sites[0], msg, cc=sites[1:], headers={"job_id": msg.job_id})
        except SagmqError as e:
            log.warning("could not reach sites %s: %s", sites, e)

    # --- events -----------------------------------------------------------------------

    def on_event(self, d: Delivery) -> None:
        """Heartbeats, contributions, aggregates, model loaded/saved."""
        limit = self.s.max_body_bytes
        t = d.msg_type
        if t == ClientHeartbeat.TYPE:
            hb = d.message(ClientHeartbeat, limit)
            if not self.s.may_speak_for(d.user_id, hb.site):  # (own user, the site's, or a simulation user's)
                raise Rejected(f"spoofed sender: user {d.user_id!r} sent a heartbeat for site {hb.site!r}")
            self.on_heartbeat(hb)
            return
        cls = _JOB_EVENTS.get(t)
        if cls is None:
            raise Rejected(f"the server queue does not take {t!r} messages")
        if t == TaskResult.TYPE:
            self._on_cross_site_result(d)
            return
        if t == RoundAggregated.TYPE and d.user_id not in (self.s.amqp_user, self.s.aggregator_user):
            raise Rejected(f"spoofed sender: user {d.user_id!r} sent an aggregate (only the aggregator's user "
                           f"{self.s.aggregator_user!r} may)")
        msg = d.message(cls, limit)
        job_id = str(getattr(msg, "job_id", ""))
        run = self.run_
        if run is None or run.job.job_id != job_id:
            log.info("ignoring %s for job %s, which is not running", t, job_id)
            return
        self._apply(run, self._feed(run.sag, msg, time.monotonic()))

    def _on_cross_site_result(self, d: Delivery) -> None:
        """A site's answer to a submit_model or validate task (the only results that come to the server)."""
        r = d.message(TaskResult, self.s.max_body_bytes)
        if not self.s.may_speak_for(d.user_id, r.site):
            raise Rejected(f"spoofed sender: user {d.user_id!r} sent a result for site {r.site!r}")
        run = self.run_
        if run is None or run.job.job_id != r.job_id or run.cse is None:
            log.info("ignoring a %s result of %s for job %s, which is not in cross-site evaluation", r.task_name,
                     r.site, r.job_id)
            return
        r = server_task_result(self._spec(r.job_id).filters, r)  # the server's task_result_filters
        self._apply(run, run.cse.on_result(r, time.monotonic()))

    @staticmethod
    def _feed(sag: ScatterAndGather, msg: Message, now: float) -> list[Effect]:
        if isinstance(msg, Contribution):
            return sag.on_contribution(msg, now)
        if isinstance(msg, RoundAggregated):
            return sag.on_aggregated(msg, now)
        if isinstance(msg, ModelLoaded):
            return sag.on_loaded(msg, now)
        if isinstance(msg, ModelSaved):
            return sag.on_saved(msg, now)
        raise Rejected(f"the server queue does not take {msg.TYPE!r} messages")

    def on_heartbeat(self, hb: ClientHeartbeat) -> None:
        """Register the site; a heartbeat naming a forwarded model the site lacks gets it the whole task."""
        now = time.monotonic()
        old = self.sites.get(hb.site)
        self.sites[hb.site] = Site(hb.site, now, hb.host, hb.pid, hb.allow_custom_code, hb.busy_job, hb.busy_round,
                                   hb.task_id, hb.task_bytes, hb.receiving_bytes)
        # a new process of the site (its hello, or another pid or host if the hello was lost) has none of
        # the tasks the old one took
        new_process = hb.hello or old is None or (old.pid, old.host) != (hb.pid, hb.host)
        prev = self.site_states.get(hb.site)
        since = now if new_process or prev is None else prev.since
        self.site_states[hb.site] = SiteState(hb.busy_job, hb.busy_round, since)
        if hb.hello or old is None:
            log.info("site %s connected (host %s, pid %d)", hb.site, hb.host, hb.pid)
        run = self.run_
        if hb.missing_model and run is not None:
            self._apply(run, run.sag.on_missing_model(hb.site, hb.missing_model, now))

    def on_reconnect(self) -> None:
        """The broker may have restarted: sites get a fresh grace period (the server could not hear
        their heartbeats while it was away), and the aggregator gets the open round again."""
        now = time.monotonic()
        for site in self.sites.values():
            site.last_seen = max(site.last_seen, now)
        run = self.run_
        if run is not None:
            self._apply(run, run.sag.on_reconnect(now))

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
        """Answer one admin command."""
        cmd, args = req.command, req.args
        if cmd == "submit":
            return self._submit(req)
        if cmd == "list":
            return AdminReply(True, {"jobs": [j.summary() for j in sorted(self.jobs.values(),
                                                                          key=lambda j: j.submitted_at)]})
        if cmd == "status":
            job_id = args.get("job_id")
            return self._job_status(job_id, args.get("history_from", 0)) if job_id else self._system_status()
        if cmd == "abort":
            return self._abort(args.get("job_id", ""))
        if cmd == "shutdown":
            return self._shutdown(str(args.get("target", "")), str(args.get("site", "")))
        return AdminReply(False, error=f"unknown command {cmd!r}")

    def _submit(self, req: AdminRequest) -> AdminReply:
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
        for w in spec.warnings:  # settings accepted that have no effect in sagmq (README)
            log.warning("job %s: %s", job.job_id, w)
        return AdminReply(True, {"job_id": job.job_id})

    def _job_status(self, job_id: str, start: Any) -> AdminReply:
        job = self._job(job_id)
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise SagmqError(f"status: history_from must be a round record index >= 0, not {start!r}")
        run = self.run_ if self.run_ is not None and self.run_.job is job else None
        if run is not None:
            run.sync()
        out = {**job.summary(), "history": job.history[start:], "history_from": start}
        if job.cross_site_eval:
            out["cross_site_eval"] = job.cross_site_eval
        if run is not None:
            out["phase"] = run.sag.phase.value
            out["waiting_for"] = run.sag.waiting_for(time.monotonic())
            out["open_round"] = run.sag.record.to_dict() if run.sag.record is not None else {}
            out["transfer"] = self._transfer(run)
            out["first_round"], out["last_round"] = run.sag.sag.start_round, run.sag.last_round
            if run.cse is not None:  # ScatterAndGather is done; cross-site evaluation runs
                now = time.monotonic()
                out["phase"], out["waiting_for"] = run.cse.phase.value, run.cse.waiting_for(now)
                out["cross_site_eval"] = run.cse.status(now)
        elif job.status == SUBMITTED:
            out["waiting_for"] = self._queued_waits_for(job)
        return AdminReply(True, out)

    def _transfer(self, run: Run) -> dict[str, Any]:
        """The open round's transfer progress (`sagmq wait` shows it for large models): the task's bytes,
        the bytes its targets said (heartbeats) they received, whole or so far, and how many results came;
        {} if no round is open."""
        rec = run.sag.record
        if rec is None or rec.aggregated is not None:
            return {}
        sites = [self.sites[t] for t in rec.targets if t in self.sites]
        whole = {x.name: x.task_bytes for x in sites if x.task_id == rec.task_id}
        size = max([self.model_bytes.get(run.job.job_id, 0), *whole.values()])
        arriving = sum(min(x.receiving_bytes, size) for x in sites if x.name not in whole)
        return {"round": rec.round, "task_bytes": size, "targets": len(rec.targets), "sites_received": len(whole),
                "received_bytes": sum(whole.values()) + arriving, "total_bytes": size * len(rec.targets),
                "results": len(rec.accepted) + len(rec.rejected)}

    def _queued_waits_for(self, job: Job) -> str:
        """What a submitted job waits for (`sagmq wait`, `status`): the running job, or sites."""
        if self.run_ is not None:
            return f"the running job {self.run_.job.job_id[:8]} to end"
        spec = self._spec(job.job_id)
        sites = self._eligible(spec, time.monotonic())
        return f"sites: {len(sites)} of {spec.min_clients} connected (min_clients={spec.min_clients})"

    def _system_status(self) -> AdminReply:
        now = time.monotonic()
        sites = [{"site": s.name, "alive": now - s.last_seen <= self.s.client_timeout_s,
                  "seen_s_ago": round(now - s.last_seen, 2), "host": s.host,
                  "allow_custom_code": s.allow_custom_code, "busy_job": s.busy_job, "busy_round": s.busy_round}
                 for s in sorted(self.sites.values(), key=lambda s: s.name)]
        return AdminReply(True, {"sites": sites, "running": self.run_.job.job_id if self.run_ else None,
                                 "queued": [j.job_id for j in self.jobs.values() if j.status == SUBMITTED]})

    def _abort(self, job_id: str) -> AdminReply:
        job = self._job(job_id)
        if job.status in ENDED:
            return AdminReply(False, error=f"job {job.job_id} already ended ({job.status})")
        run = self.run_
        if run is not None and run.job is job and run.cse is not None:
            self._apply(run, run.cse.abort("aborted by the admin", time.monotonic()))
        elif run is not None and run.job is job:
            self._apply(run, run.sag.abort("aborted by the admin", time.monotonic()))
        else:
            self._end_queued(job, ABORTED, "aborted by the admin")
        return AdminReply(True, {"job_id": job.job_id, "status": ABORTED})

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
