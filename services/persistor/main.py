"""The persistor service: hosts one NPModelPersistor per job; loads and saves models, records job
meta and history, serves downloads.

The component owns the files; this service is the adapter that carries messages to it: it
holds a round's aggregate unacked until the server's model.commit (or a later round built
on it) says to save it, and acks each message only once what it asks for is on disk.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from sagmq.persistor.np_model_persistor import NPModelPersistor
from sagmq.runtime.lifecycle import serve
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


@dataclass(slots=True)
class _Held:
    """A delivery held unacked until what it asks for is on disk."""

    delivery: Delivery
    msg: Any
    since: float


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
        bus.on_reconnect.append(self.forget_held)

    def run(self) -> None:
        """Serve until stopped."""
        self.bus.consume(self.bus.names.persistor_queue, self.on_message, prefetch=0)  # saves come in held parts
        log.info("persistor ready (store %s)", self.root)
        self.bus.run(self.stop, self.tick, 1.0)

    def forget_held(self) -> None:
        """After a reconnect the held deliveries come again."""
        self.aggregates.clear()
        self.commits.clear()

    def tick(self) -> None:
        """Write history that came since the last write; a commit whose aggregate never came is
        dead-lettered (the server's round then shows it)."""
        for p in self.persistors.values():
            p.flush_history()
        for job, (rnd, path) in list(self.unconfirmed.items()):
            self._saved(job, rnd, path, now=True)
        now = time.monotonic()
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
            self.on_save(d.message(ModelSave, limit))
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
            if ev.history:
                p.replace_history(ev.history)
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
            loaded = p.load()
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
        self.bus.publish(self.bus.names.events, RK_MODEL_LOADED,
                         ModelLoaded(m.job_id, loaded.source, DXO(WEIGHTS, loaded.weights), nxt),
                         headers={"job_id": m.job_id})

    def on_save(self, m: ModelSave) -> None:
        """Save durably, then confirm with model.saved."""
        self._save(m.job_id, m.round, m.dxo, m.model_dir, m.model_name, m.history, m.final)
        self._drop_held(m.job_id, m.round)

    def _save(self, job_id: str, rnd: int, dxo: DXO, model_dir: str, model_name: str,
              history: list[dict[str, Any]], final: bool, how: str = "model.save") -> None:
        p = self._locate(job_id, model_dir, model_name)
        path = p.save(rnd, dict(dxo.data))
        if history:
            p.merge_history(history)
        log.info("saved model of job %s round %d to %s (%s)", job_id, rnd, path, how)
        self._saved(job_id, rnd, str(path), final)

    def _saved(self, job_id: str, rnd: int, path: str, now: bool) -> None:
        """model.saved for this round (and the ones saved before it): now, or with the next tick."""
        if not now and time.monotonic() - self.confirmed_at.get(job_id, -SAVED_EVERY_S) < SAVED_EVERY_S:
            self.unconfirmed[job_id] = (rnd, path)
            return
        self.unconfirmed.pop(job_id, None)
        self.confirmed_at[job_id] = time.monotonic()
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
        self.aggregates[m.job_id] = _Held(d, m, time.monotonic())
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
        self.commits[m.job_id] = _Held(d, m, time.monotonic())

    def _commit(self, d: Delivery, m: ModelCommit) -> None:
        a = self.aggregates.pop(m.job_id)
        self._save(m.job_id, m.round, a.msg.dxo, m.model_dir, m.model_name, m.history, m.final,
                   "model.commit of its aggregate")
        self.bus.ack(a.delivery)
        if d.deferred:
            self.bus.ack(d)

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
        else:
            self._save(job, a.msg.round, a.msg.dxo, target[0], target[1], [], False,
                       "committed by the next round's aggregate")
        self.bus.ack(a.delivery)

    def _drop_held(self, job_id: str, upto_round: int | None) -> None:
        """Let go of a job's held aggregate and commit (those of rounds up to upto_round, or all)."""
        for held in (self.aggregates, self.commits):
            h = held.get(job_id)
            if h is not None and (upto_round is None or h.msg.round <= upto_round):
                del held[job_id]
                self.bus.ack(h.delivery)

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


def main(argv: list[str] | None = None) -> int:
    """Entry point of `sagmq persistor`."""
    return serve("persistor", PersistorService, argv)
