"""The persistor service: loads and saves models, records job meta, serves downloads."""

from __future__ import annotations

import logging
import threading

from services.persistor.store import ModelStore
from services.wire.bus import Bus, Delivery
from services.wire.codec import DXO, WEIGHTS
from services.wire.errors import Rejected, SagmqError
from services.wire.lifecycle import serve
from services.wire.messages import (
    AdminReply,
    AdminRequest,
    Control,
    JobEvent,
    ModelLoad,
    ModelLoaded,
    ModelSave,
    ModelSaved,
)
from services.wire.settings import Settings
from services.wire.topology import RK_MODEL_LOADED, RK_MODEL_SAVED

log = logging.getLogger(__name__)


class PersistorService:
    """Answers model.load, performs model.save, keeps meta/history, serves download."""

    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.s = settings
        self.bus = bus
        self.store = ModelStore(settings.workspace)
        self.stop = threading.Event()

    def run(self) -> None:
        """Serve until stopped."""
        self.bus.consume(self.bus.names.persistor_queue, self.on_message, prefetch=0)  # saves come in held parts
        log.info("persistor ready (store %s)", self.store.root)
        self.bus.run(self.stop)

    def on_message(self, d: Delivery) -> None:
        """Dispatch by message type."""
        limit = self.s.max_body_bytes
        if d.msg_type == ModelLoad.TYPE:
            self.on_load(d.message(ModelLoad, limit))
        elif d.msg_type == ModelSave.TYPE:
            self.on_save(d.message(ModelSave, limit))
        elif d.msg_type == JobEvent.TYPE:
            ev = d.message(JobEvent, limit)
            self.store.write_json(ev.job_id, "meta.json", {**ev.meta, "job_id": ev.job_id, "name": ev.name,
                                                           "status": ev.status, "reason": ev.reason})
            if ev.history:
                self.store.write_json(ev.job_id, "history.json", ev.history)
        elif d.msg_type == AdminRequest.TYPE:
            self.on_admin(d, d.message(AdminRequest, limit))
        elif d.msg_type == Control.TYPE:
            if d.message(Control, limit).command == "shutdown":
                log.info("shutdown requested")
                self.stop.set()
        else:
            raise Rejected(f"the persistor queue does not take {d.msg_type!r} messages")

    def on_load(self, m: ModelLoad) -> None:
        """Send the job's starting model (the saved one when resuming)."""
        try:
            weights, source, last = self.store.load(m.job_id, m.model_dir, m.model_name, m.initial, m.source)
        except (SagmqError, OSError, ValueError) as e:
            log.error("cannot load the model of job %s: %s", m.job_id, e)
            self.bus.publish(self.bus.names.events, RK_MODEL_LOADED,
                             ModelLoaded(m.job_id, "error", None, error=f"the persistor cannot load the model: {e}"),
                             headers={"job_id": m.job_id})
            return
        nxt = -1 if last is None else last + 1
        log.info("model of job %s loaded from %s%s", m.job_id, source, "" if last is None else f" (round {last})")
        self.bus.publish(self.bus.names.events, RK_MODEL_LOADED, ModelLoaded(m.job_id, source, DXO(WEIGHTS, weights), nxt),
                         headers={"job_id": m.job_id})

    def on_save(self, m: ModelSave) -> None:
        """Save durably, then confirm with model.saved."""
        path = self.store.save(m.job_id, m.round, dict(m.dxo.data), m.model_dir, m.model_name)
        if m.history:
            self.store.merge_history(m.job_id, m.history)
        log.info("saved model of job %s round %d to %s", m.job_id, m.round, path)
        self.bus.publish(self.bus.names.events, RK_MODEL_SAVED,
                         ModelSaved(m.job_id, m.round, str(path)), headers={"job_id": m.job_id, "round": m.round})

    def on_admin(self, d: Delivery, req: AdminRequest) -> None:
        """download JOB_ID: every file the persistor holds for the job."""
        if req.command != "download":
            self.bus.reply(d, AdminReply(False, error=f"the persistor does not serve {req.command!r}"))
            return
        job_id = str(req.args.get("job_id", ""))
        try:
            files = self.store.files(job_id)
        except SagmqError as e:
            self.bus.reply(d, AdminReply(False, error=str(e)))
            return
        self.bus.reply(d, AdminReply(True, {"job_id": job_id, "count": len(files)}, files=files))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `sagmq persistor`."""
    return serve("persistor", PersistorService, argv)
