"""The persistor service: hosts one NPModelPersistor per job; loads and saves models, records job
meta and history, serves downloads.

The component owns the files; this service is the adapter that carries messages to it: it
holds a round's aggregate unacked until the server's model.commit (or a later round built
on it) says to save it, and acks each message only once what it asks for is on disk.

A save the disk refuses (an OSError: a full or read-only file system, a missing folder) is not a
bad message: it stays unacked, with the job's later saves held behind it in order, and is retried
on the tick with capped exponential backoff (RETRY_FIRST_S doubling to RETRY_MAX_S). Each distinct
error (errno and file) is logged once, its repeats at most every LOG_REPEAT_S with a count. The
server hears of it in a model.saved with the error (at once, at a new error and every REPORT_EVERY_S),
so `sagmq status` says what the job waits for; past SAGMQ_PERSIST_RETRY_LIMIT_S the held saves are
dead-lettered and the model.saved says gave_up, and the server fails the job with the error.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagmq.persistor.np_model_persistor import NPModelPersistor, write_model
from sagmq.runtime.lifecycle import serve
from sagmq.storage.files import atomic_write, atomic_write_with
from sagmq.wire.bus import Bus, Delivery
from sagmq.wire.codec import DXO, WEIGHTS
from sagmq.wire.errors import Rejected, SagmqError
from sagmq.wire.messages import (
    ABORTED,
    FAILED,
    FINISHED,
    AdminReply,
    AdminRequest,
    Control,
    CrossValSave,
    JobEvent,
    ModelCommit,
    ModelLoad,
    ModelLoaded,
    ModelSave,
    ModelSaved,
    RoundAggregated,
)
from sagmq.wire.settings import Settings, check_name
from sagmq.wire.topology import RK_MODEL_LOADED, RK_MODEL_SAVED

log = logging.getLogger(__name__)
SAVED_EVERY_S = 1.0
# A save the disk refused is tried again after RETRY_FIRST_S, then after twice as long each time, up to
# RETRY_MAX_S (the service ticks once a second); the server hears of it at once, then every REPORT_EVERY_S.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 10.0
REPORT_EVERY_S = 10.0
LOG_REPEAT_S = 60.0  # an error seen before is logged again at most this often, with its count
_TEMP_NAME = re.compile(r"\..+\.tmp")  # atomic_write's temporary files: the error names the file saved instead


@dataclass(slots=True)
class _Held:
    """A delivery held unacked until what it asks for is on disk."""

    delivery: Delivery
    msg: Any
    since: float


@dataclass(slots=True)
class _Write:
    """One save of a job's round, and the deliveries to ack once it is on disk."""

    job_id: str
    round: int
    dxo: DXO
    model_dir: str
    model_name: str
    history: list[dict[str, Any]]
    final: bool
    how: str
    target: Path  # the model file it writes
    deliveries: list[Delivery]


@dataclass(slots=True)
class _Stalled:
    """A job whose saves the disk refuses: the refused one first, the later ones behind it, in order."""

    writes: deque[_Write]
    since: float  # the first refusal since the disk last took a save of the job
    error: str = ""
    tries: int = 0
    next_try: float = 0.0
    reported_at: float = float("-inf")
    reported: str = ""  # the error the server was last told


@dataclass(slots=True)
class RepeatLog:
    """Logs the first occurrence of each distinct error at ERROR at once, and its repeats at most once every
    every_s seconds with how many there were: a disk that stays full must not fill the log too."""

    every_s: float = LOG_REPEAT_S
    seen: dict[Hashable, list[float]] = field(default_factory=dict)  # key -> [logged at, repeats since]

    def error(self, key: Hashable, now: float, msg: str, *args: Any) -> None:
        """Log msg % args, unless this key was logged less than every_s ago."""
        s = self.seen.get(key)
        if s is None:
            self.seen[key] = [now, 0]
            log.error(msg, *args)
            return
        s[1] += 1
        if now - s[0] >= self.every_s:
            log.error(msg + " (%d time(s) in the last %.0f s)", *args, int(s[1]), now - s[0])
            s[0], s[1] = now, 0

    def forget(self, match: Callable[[Hashable], bool]) -> None:
        """Forget the keys that match: their next occurrence is news again."""
        for key in [k for k in self.seen if match(k)]:
            del self.seen[key]


def describe(e: OSError, target: Path) -> str:
    """An I/O error as the log and the server show it: errno, its meaning, and the file (the model file
    being saved when the error names a temporary file, or none)."""
    name = e.filename if isinstance(e.filename, str) and not _TEMP_NAME.fullmatch(Path(e.filename).name) else target
    if e.errno is None:
        return f"{e}: {name}"
    return f"[Errno {e.errno}] {e.strerror}: {name}"


class PersistorService:
    """Answers model.load, performs model.save and model.commit, keeps meta/history, serves download."""

    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.s = settings
        self.bus = bus
        self.root = settings.workspace / "persistor" / "jobs"
        self.persistors: dict[str, NPModelPersistor] = {}  # job -> its persistor, made on first use
        self.stop = threading.Event()
        self.aggregates: dict[str, _Held] = {}  # job -> its latest aggregate routed here, held
        self.commits: dict[str, _Held] = {}  # job -> a model.commit whose aggregate has not come yet
        self.targets: dict[str, tuple[str, str]] = {}  # job -> (model_dir, model_name) it is saved as
        # model.saved: at once for a job's last round (the server waits for it) or when none went in the
        # last SAVED_EVERY_S, else the latest saved round once a second (a job of many short rounds)
        self.unconfirmed: dict[str, tuple[int, str]] = {}  # job -> (round, path) saved, not yet confirmed
        self.confirmed_at: dict[str, float] = {}
        self.clock: Callable[[], float] = time.monotonic  # (tests run the retries on a clock of their own)
        self.stalled: dict[str, _Stalled] = {}  # job -> its saves the disk refuses, retried in order
        self.given_up: set[str] = set()  # jobs whose saves failed past the limit: a new refusal is final
        self.disk_log = RepeatLog()
        bus.on_reconnect.append(self.forget_held)

    def run(self) -> None:
        """Serve until stopped."""
        self.bus.consume(self.bus.names.persistor_queue, self.on_message, prefetch=0)  # saves come in held parts
        log.info("persistor ready (store %s)", self.root)
        self.bus.run(self.stop, self.tick, 1.0)

    def forget_held(self) -> None:
        """After a reconnect the held deliveries come again (refused saves too: their job's retry clock goes on)."""
        self.aggregates.clear()
        self.commits.clear()
        for st in self.stalled.values():
            st.writes.clear()

    def tick(self) -> None:
        """Write history that came since the last write; a commit whose aggregate never came is
        dead-lettered (the server's round then shows it); retry the saves the disk refused."""
        now = self.clock()
        self._retry(now)
        for job, p in self.persistors.items():
            try:
                p.flush_history()
            except OSError as e:  # the next merge or the job's end writes it again
                self.disk_log.error((job, e.errno, "history"), now, "cannot write the history of job %s: %s",
                                    job, describe(e, p.job_dir / "history.json"))
        for job, (rnd, path) in list(self.unconfirmed.items()):
            self._saved(job, rnd, path, now=True)
        for job, c in list(self.commits.items()):
            if now - c.since > self.s.chunk_timeout_s:
                del self.commits[job]
                self.bus.dead_letter(c.delivery, f"model.commit for round {c.msg.round} of job {job}: its aggregate "
                                                 f"(task {c.msg.task_id}) did not come within "
                                                 f"{self.s.chunk_timeout_s:g} s")

    def on_message(self, d: Delivery) -> None:
        """Dispatch by message type."""
        limit = self.s.max_body_bytes
        if d.msg_type == ModelLoad.TYPE:
            self.on_load(d.message(ModelLoad, limit))
        elif d.msg_type == ModelSave.TYPE:
            self.on_save(d, d.message(ModelSave, limit))
        elif d.msg_type == RoundAggregated.TYPE:
            self.on_aggregate(d, d.message(RoundAggregated, limit))
        elif d.msg_type == ModelCommit.TYPE:
            self.on_commit(d, d.message(ModelCommit, limit))
        elif d.msg_type == JobEvent.TYPE:
            ev = d.message(JobEvent, limit)
            if ev.status in (FINISHED, FAILED, ABORTED):
                self._drop_held(ev.job_id, None)
            p = self.persistor(ev.job_id)
            p.write_json("meta.json", {**ev.meta, "job_id": ev.job_id, "name": ev.name,
                                       "status": ev.status, "reason": ev.reason})
            if ev.history:  # merged: a record never loses its round to a stale copy
                p.merge_history(ev.history, at_once=True)
        elif d.msg_type == CrossValSave.TYPE:
            self.on_cross_val(d.message(CrossValSave, limit))
        elif d.msg_type == AdminRequest.TYPE:
            self.on_admin(d, d.message(AdminRequest, limit))
        elif d.msg_type == Control.TYPE:
            if d.message(Control, limit).command == "shutdown":
                log.info("shutdown requested")
                self.stop.set()
        else:
            raise Rejected(f"the persistor queue does not take {d.msg_type!r} messages")

    def persistor(self, job_id: str) -> NPModelPersistor:
        """The job's persistor (ConfigError for a job id that cannot be a folder name)."""
        p = self.persistors.get(job_id)
        if p is None:
            p = self.persistors[job_id] = NPModelPersistor(self.root / check_name("job id", job_id))
        return p

    def _locate(self, job_id: str, model_dir: str, model_name: str) -> NPModelPersistor:
        """The job's persistor, saving to model_dir/model_name from now on."""
        p = self.persistor(job_id)
        p.model_dir, p.model_name = model_dir, model_name
        self.targets[job_id] = (model_dir, model_name)
        return p

    def on_load(self, m: ModelLoad) -> None:
        """Send the job's starting model (the saved one when resuming)."""
        try:
            p = self._locate(m.job_id, m.model_dir, m.model_name)
            p.model, p.source_ckpt_file_full_name = m.initial, m.source
            loaded = p.load(m.snapshot_every_n_rounds)
        except (SagmqError, OSError, ValueError) as e:
            log.error("cannot load the model of job %s: %s", m.job_id, e)
            self.bus.publish(self.bus.names.events, RK_MODEL_LOADED,
                             ModelLoaded(m.job_id, "error", None, error=f"the persistor cannot load the model: {e}"),
                             headers={"job_id": m.job_id})
            return
        last = loaded.last_round
        nxt = -1 if last is None else last + 1
        log.info("model of job %s loaded from %s%s", m.job_id, loaded.source,
                 "" if last is None else f" (round {last})")
        # a resumed job's records go back with it: a restarted server's own copy lags (jobs.json)
        history = [] if last is None else p.history()
        self.bus.publish(self.bus.names.events, RK_MODEL_LOADED,
                         ModelLoaded(m.job_id, loaded.source, DXO(WEIGHTS, loaded.weights), nxt, history=history),
                         headers={"job_id": m.job_id})

    def on_save(self, d: Delivery, m: ModelSave) -> None:
        """Save durably, then confirm with model.saved."""
        self._save(m.job_id, m.round, m.dxo, m.model_dir, m.model_name, m.history, m.final, [d])
        self._drop_held(m.job_id, m.round)

    def _save(self, job_id: str, rnd: int, dxo: DXO, model_dir: str, model_name: str,
              history: list[dict[str, Any]], final: bool, deliveries: list[Delivery], how: str = "model.save") -> None:
        """Save now and ack the deliveries, or, if the disk refuses it or an earlier save of the job waits
        for the disk, hold them unacked and save in turn (see the module docstring)."""
        p = self._locate(job_id, model_dir, model_name)
        w = _Write(job_id, rnd, dxo, model_dir, model_name, history, final, how, p.model_file(dxo.data), deliveries)
        st = self.stalled.get(job_id)
        if st is not None:
            _hold(w)
            st.writes.append(w)
            return
        try:
            self._write(w)
        except OSError as e:
            _hold(w)
            now = self.clock()
            st = self.stalled[job_id] = _Stalled(deque([w]), now)
            self._refused(st, w, e, now)
            return
        self._written(w)

    def _write(self, w: _Write) -> None:
        """Write a save to disk (OSError if the disk refuses it)."""
        p = self._locate(w.job_id, w.model_dir, w.model_name)
        path = p.save(w.round, dict(w.dxo.data))
        if w.history:
            p.merge_history(w.history)
        log.info("saved model of job %s round %d to %s (%s)", w.job_id, w.round, path, w.how)

    def _written(self, w: _Write) -> None:
        """A save is on disk: ack what asked for it (held ones; the handler acks its own) and confirm."""
        self.given_up.discard(w.job_id)
        for d in w.deliveries:
            if d.deferred:
                self.bus.ack(d)
        self._saved(w.job_id, w.round, str(w.target), w.final)

    def _retry(self, now: float) -> None:
        """Try each stalled job's held saves again when their time has come, in order."""
        for job, st in list(self.stalled.items()):
            if now >= st.next_try:
                self._retry_job(job, st, now)
            elif st.writes and now - st.reported_at >= REPORT_EVERY_S:
                self._report(st, st.writes[0], now)  # the server's own limit counts from our last word

    def _retry_job(self, job: str, st: _Stalled, now: float) -> None:
        """Write the job's held saves in order, until the disk refuses one again or none is left."""
        written = 0
        while st.writes:
            w = st.writes[0]
            try:
                self._write(w)
            except OSError as e:
                self._refused(st, w, e, now)
                return
            except Exception as e:  # a bug, not the disk: dead-lettered once, as a handler's would be
                log.exception("saving round %d of job %s failed", w.round, job)
                st.writes.popleft()
                for d in w.deliveries:
                    self.bus.dead_letter(d, f"internal error: {type(e).__name__}: {e}")
                continue
            st.writes.popleft()
            self._written(w)
            written += 1
            st.since, st.tries = now, 0  # the disk took one: the limit counts from its next refusal
        del self.stalled[job]  # (none left: after a reconnect they come again, and start afresh)
        self.disk_log.forget(lambda k: isinstance(k, tuple) and k[0] == job)
        if written:
            log.info("the disk takes the saves of job %s again: %d held save(s) written", job, written)

    def _refused(self, st: _Stalled, w: _Write, e: OSError, now: float) -> None:
        """The disk refused w: log it (once per distinct error), tell the server, retry later or give up."""
        st.error = describe(e, w.target)
        limit = self.s.persist_retry_limit_s
        self.disk_log.error((w.job_id, st.error), now,
                            "cannot save round %d of job %s: %s; held, and retried for up to %g s "
                            "(SAGMQ_PERSIST_RETRY_LIMIT_S)", w.round, w.job_id, st.error, limit)
        if now - st.since >= limit or w.job_id in self.given_up:
            self._give_up(st, w, now)
            return
        # the last try falls on the limit itself: the job fails then, not up to a backoff later
        st.next_try = min(now + min(RETRY_MAX_S, RETRY_FIRST_S * 2**st.tries), st.since + limit)
        st.tries += 1
        if st.error != st.reported or now - st.reported_at >= REPORT_EVERY_S:
            self._report(st, w, now)

    def _give_up(self, st: _Stalled, w: _Write, now: float) -> None:
        """Past the limit: dead-letter the job's held saves and tell the server, which fails the job."""
        del self.stalled[w.job_id]
        self.given_up.add(w.job_id)
        reason = (f"the persistor could not save round {w.round} of job {w.job_id} for {now - st.since:.0f} s "
                  f"(SAGMQ_PERSIST_RETRY_LIMIT_S={self.s.persist_retry_limit_s:g}): {st.error}")
        log.error("%s; giving up: %d held save(s) dead-lettered", reason, len(st.writes))
        for held in st.writes:
            for d in held.deliveries:
                self.bus.dead_letter(d, reason)
        self._report(st, w, now, gave_up=True)

    def _report(self, st: _Stalled, w: _Write, now: float, gave_up: bool = False) -> None:
        """model.saved with the error: the round is not on disk (the server shows why, or fails the job)."""
        st.reported, st.reported_at = st.error, now
        msg = ModelSaved(w.job_id, w.round, str(w.target), st.error, round(now - st.since, 1), gave_up)
        try:
            self.bus.publish(self.bus.names.events, RK_MODEL_SAVED, msg, headers={"job_id": w.job_id, "round": w.round})
        except SagmqError as e:  # told again at the next report, or the server's own limit ends the wait
            log.warning("could not tell the server that job %s's saves fail: %s", w.job_id, e)

    def _saved(self, job_id: str, rnd: int, path: str, now: bool) -> None:
        """model.saved for this round (and the ones saved before it): now, or with the next tick."""
        if not now and self.clock() - self.confirmed_at.get(job_id, -SAVED_EVERY_S) < SAVED_EVERY_S:
            self.unconfirmed[job_id] = (rnd, path)
            return
        self.unconfirmed.pop(job_id, None)
        self.confirmed_at[job_id] = self.clock()
        self.bus.publish(self.bus.names.events, RK_MODEL_SAVED, ModelSaved(job_id, rnd, path),
                         headers={"job_id": job_id, "round": rnd})

    def _done_already(self, job_id: str, rnd: int) -> bool:
        last = self.persistor(job_id).last_round()
        return last is not None and rnd <= last

    def on_aggregate(self, d: Delivery, m: RoundAggregated) -> None:
        """Hold a round's aggregate (it will be the saved model) until the server's model.commit or a
        later round's aggregate that was built on it (commits) says to save it."""
        if m.dxo is None or not m.dxo.data:
            raise Rejected(f"the aggregate of round {m.round} of job {m.job_id} carries no model to save")
        if self._done_already(m.job_id, m.round):
            return  # a round saved before (a redelivery): nothing to keep
        old = self.aggregates.get(m.job_id)
        if old is not None and m.commits and m.commits == old.msg.task_id and old.msg.round < m.round:
            self._commit_implied(old)  # the server built this round on the held aggregate
            old = None
        if old is not None and old.msg.round > m.round:
            return  # an older round's aggregate, overtaken
        if old is not None:
            if old.msg.round < m.round:  # the server commits before the next task, or with it: unexpected
                log.warning("the aggregate of round %d of job %s was not committed before round %d's came: "
                            "round %d gets no snapshot of its own", old.msg.round, m.job_id, m.round, old.msg.round)
            self.bus.ack(old.delivery)  # replaced: a later round, or the same round aggregated again
        d.deferred = True
        self.aggregates[m.job_id] = _Held(d, m, self.clock())
        c = self.commits.get(m.job_id)
        if c is not None and (c.msg.round, c.msg.task_id) == (m.round, m.task_id):
            del self.commits[m.job_id]
            self._commit(c.delivery, c.msg)

    def on_commit(self, d: Delivery, m: ModelCommit) -> None:
        """Save the held aggregate of the round as its global model (or wait for it to come)."""
        if self._done_already(m.job_id, m.round):
            # saved before this redelivery: confirm again
            self._saved(m.job_id, m.round, str(self.persistor(m.job_id).job_dir / m.model_dir / m.model_name), True)
            return
        a = self.aggregates.get(m.job_id)
        if a is not None and (a.msg.round, a.msg.task_id) == (m.round, m.task_id):
            self._commit(d, m)
            return
        old = self.commits.get(m.job_id)
        if old is not None:
            self.bus.ack(old.delivery)  # superseded by a newer commit
        d.deferred = True
        self.commits[m.job_id] = _Held(d, m, self.clock())

    def _commit(self, d: Delivery, m: ModelCommit) -> None:
        a = self.aggregates.pop(m.job_id)
        self._save(m.job_id, m.round, a.msg.dxo, m.model_dir, m.model_name, m.history, m.final, [a.delivery, d],
                   "model.commit of its aggregate")

    def _commit_implied(self, a: _Held) -> None:
        """Save a held aggregate that a later round's aggregate says the server built on (RoundOpen.commits),
        as the server's model.commit would have, to the file the job's model is saved as."""
        job = a.msg.job_id
        del self.aggregates[job]
        target = self.targets.get(job)
        if target is None:  # a restarted persistor: the file the job's last save went to
            last = self.persistor(job).last_saved()
            target = None if last is None else (last[1], last[2])
        if target is None:
            log.warning("round %d of job %s was committed by the next round's aggregate, but no model.load or save "
                        "told where the job's model goes: round %d gets no snapshot", a.msg.round, job, a.msg.round)
            self.bus.ack(a.delivery)
            return
        self._save(job, a.msg.round, a.msg.dxo, target[0], target[1], [_saved_round_record(a.msg)], False,
                   [a.delivery], "committed by the next round's aggregate")

    def _drop_held(self, job_id: str, upto_round: int | None) -> None:
        """Let go of a job's held aggregate and commit (those of rounds up to upto_round, or all)."""
        for held in (self.aggregates, self.commits):
            h = held.get(job_id)
            if h is not None and (upto_round is None or h.msg.round <= upto_round):
                del held[job_id]
                self.bus.ack(h.delivery)

    def on_cross_val(self, m: CrossValSave) -> None:
        """Cross-site evaluation's output, in the job's folder as NVFlare lays it out: a submitted model as
        <cross_val_dir>/model_shareables/<site>.npy (.npz for several arrays), the results matrix as the JSON
        file it names (cross_site_val/cross_val_results.json). Acked once written and fsynced; a disk that
        refuses it dead-letters it with the error (the job's results are then missing from download)."""
        p = self.persistor(m.job_id)
        try:
            if m.model_owner:
                check_name("model owner", m.model_owner)
                dxo = m.dxo
                if dxo is None or not dxo.data:
                    raise Rejected(f"cross-site model of {m.model_owner} for job {m.job_id} carries no arrays")
                npz = len(dxo.data) > 1
                path = _inside(p.job_dir, f"{m.cross_val_dir}/model_shareables/{m.model_owner}.{'npz' if npz else 'npy'}")
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_with(path, lambda f: write_model(f, dict(dxo.data), npz))
                log.info("saved the model %s submitted for cross-site evaluation of job %s to %s", m.model_owner,
                         m.job_id, path)
            if m.results_path:
                path = _inside(p.job_dir, m.results_path)
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, json.dumps(m.results, indent=2, sort_keys=True).encode())
                log.info("saved the cross-site evaluation results of job %s to %s", m.job_id, path)
        except OSError as e:
            raise Rejected(f"cannot save cross-site evaluation output of job {m.job_id}: {e}") from e

    def on_admin(self, d: Delivery, req: AdminRequest) -> None:
        """download JOB_ID: every file the persistor holds for the job."""
        if req.command != "download":
            self.bus.reply(d, AdminReply(False, error=f"the persistor does not serve {req.command!r}"))
            return
        job_id = str(req.args.get("job_id", ""))
        try:
            p = self.persistors.get(job_id) or NPModelPersistor(self.root / check_name("job id", job_id))
            files = p.files()
        except SagmqError as e:
            self.bus.reply(d, AdminReply(False, error=str(e)))
            return
        self.bus.reply(d, AdminReply(True, {"job_id": job_id, "count": len(files)}, files=files))


def _inside(root: Path, rel: str) -> Path:
    """root/rel, refused (Rejected) if it would leave root."""
    path = (root / rel).resolve()
    if root.resolve() not in path.parents:
        raise Rejected(f"path {rel!r} leaves the job's folder")
    return path


def _hold(w: _Write) -> None:
    """Keep a save's deliveries unacked (the handler that got one must not ack it) until it is on disk."""
    for d in w.deliveries:
        d.deferred = True


def _saved_round_record(m: RoundAggregated) -> dict[str, Any]:
    """What the persistor knows of a round it saved by an implied commit, whose record the server sends
    only with a later save: kept if that never comes (the server was killed), replaced when it does."""
    return {"round": m.round, "task_id": m.task_id, "accepted": list(m.accepted), "aggregated": list(m.accepted),
            "saved_at": time.time(), "recorded_by": "persistor"}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `sagmq persistor`."""
    return serve("persistor", PersistorService, argv)
