"""CrossSiteModelEval: NVFlare's cross-site evaluation as a pure state machine (events and the clock in,
effects out), run by the server after ScatterAndGather finished, in the same job.

The choreography (docs/protocol.md, "Cross-site evaluation"):

1. The participants are ``participating_clients``, or the sites alive (and given an app by the deploy
   map) when it starts. With none, it waits up to ``wait_for_clients_timeout`` for one, then ends the
   job without results (as NVFlare quits its validation). Named participants that are not alive get
   that long to appear; those still missing then are left out (and listed in its status).
2. One ``submit_model`` task goes to every participant (one publish, fanned out by the broker); each
   site answers with its local model (NPTrainer's best_numpy.npy) as a WEIGHTS DXO. A model that travels
   in parts (``submit_one_at_a_time``: the server's model is at least SAGMQ_CHUNK_BYTES) is asked of one
   site at a time instead, the next once the last answered or was given up: the server's queue holds the
   parts of at most two large messages at once (its prefetch), and more answers in parts at the same time
   would stall one another's assembly.
3. Every model, the server's (NPModelLocator: ``SRV_server``, the final global model) at once and each
   site's as it comes, goes out in one ``validate`` task to every participant (one publish each, fanned
   out), its owner in the DXO's meta (``model_owner``). Each site answers with a METRICS DXO.
4. Results of both tasks come to the server, not to the aggregator (the task says ``result_to``); a
   site's model also goes to the persistor (``cross_val.save``: cross_site_val/model_shareables/<site>)
   unless ``cleanup_models``; the server forgets it once its validate task is out.
5. When every participant answered every task, or gave up on by the rules below, the results matrix
   goes to the persistor (cross_val.save: cross_site_val/cross_val_results.json, where the job's
   ValidationJsonGenerator says) and the job ends behind it on the same sending channel.

No wait without a limit: the submit_model task ends after ``submit_model_timeout`` and each validate
task after ``validation_timeout`` (0: no limit, as in NVFlare); an outstanding answer of a participant
that stopped heartbeating (not alive: silent for SAGMQ_CLIENT_TIMEOUT_S) is given up at once. A result
with an error return code, or of the wrong kind, is logged and recorded as a failure; the matrix holds
only METRICS results, as NVFlare's JSON generator does.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from sagmq.job.cross_site_spec import CSEConfig
from sagmq.job.spec import JobSpec
from sagmq.server.np_formatter import NPFormatter, ValidationJsonGenerator, metrics_of
from sagmq.server.np_model_locator import NPModelLocator
from sagmq.server.scatter_and_gather import ControlSites, EndJob, SendTask
from sagmq.wire.codec import DXO, METRICS, WEIGHTS
from sagmq.wire.messages import (
    ABORTED,
    FINISHED,
    RC_OK,
    RESULT_TO_SERVER,
    Control,
    CrossValSave,
    TaskResult,
    TrainTask,
)

log = logging.getLogger(__name__)

MODEL_OWNER = "model_owner"  # NVFlare's AppConstants.MODEL_OWNER: in a validate task's DXO meta
SUBMIT_MODEL_NAME = "submit_model_name"  # NVFlare's header on the submit_model task
BEST_MODEL = "best_model"  # NVFlare's ModelName.BEST_MODEL
MODELS_DIR = "model_shareables"  # NVFlare's CROSS_VAL_MODEL_DIR_NAME, under cross_val_dir


class CSEPhase(str, Enum):  # noqa: UP042 (StrEnum needs Python 3.11; the package supports 3.10)
    """Where cross-site evaluation is; the value is what `sagmq status` shows."""

    WAITING = "cross_site_waiting"  # waiting for participants to be alive
    RUNNING = "cross_site_eval"  # submit_model / validate tasks are out
    DONE = "done"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class SaveCrossVal:
    """A submitted model or the results matrix to the persistor (cross_val.save; sent in order)."""

    message: CrossValSave


CSEEffect = SendTask | ControlSites | EndJob | SaveCrossVal
CSEEffects = list[CSEEffect]


@dataclass(slots=True)
class _Task:
    """One submit_model or validate task and who still owes an answer."""

    task_id: str
    name: str
    owner: str  # the model validated ("" for submit_model)
    sent_at: float
    timeout: float  # 0: none
    outstanding: set[str]
    answered: set[str] = field(default_factory=set)
    given_up: set[str] = field(default_factory=set)


class CrossSiteModelEval:
    """Cross-site evaluation of one job: its tasks, the models it got and the results matrix."""

    def __init__(self, job_id: str, spec: JobSpec, cfg: CSEConfig, *, round: int, wall_offset: float = 0.0,
                 submit_one_at_a_time: bool = False) -> None:
        self.job_id = job_id
        self.submit_one_at_a_time = submit_one_at_a_time
        self.spec = spec
        self.cfg = cfg
        self.round = round  # what the tasks carry as their round: the one after training's last
        self.wall_offset = wall_offset
        self.apps = spec.client_apps()
        self.phase = CSEPhase.WAITING
        self.phase_since = 0.0
        self.participants: tuple[str, ...] = ()
        self.missing: list[str] = []  # named participants that never appeared
        self.tasks: dict[str, _Task] = {}
        self.matrix: dict[str, dict[str, DXO]] = {}  # data client -> model owner -> its result DXO
        self.failures: list[dict[str, str]] = []
        self.models: list[str] = []  # owners of the models sent for validation
        self._server_models: dict[str, DXO] = {}
        self._alive: frozenset[str] = frozenset()
        self._to_submit: list[str] = []  # participants not asked for their model yet (one at a time)

    # --- events ------------------------------------------------------------------------------

    def start(self, now: float, alive: Collection[str], global_model: Mapping[str, np.ndarray]) -> CSEEffects:
        """Begin: locate the server models, then wait for the participants (or send the tasks at once)."""
        self._alive = frozenset(alive)
        if self.cfg.locator is not None:
            self._server_models = NPModelLocator(self.cfg.locator, global_model).server_models()
            log.info("job %s: cross-site evaluation: server models %s", self.job_id,
                     ", ".join(self._server_models) or "none")
        else:
            log.info("job %s: cross-site evaluation without a model locator: no server model is validated",
                     self.job_id)
        self.phase, self.phase_since = CSEPhase.WAITING, now
        return self._try_begin(now)

    def on_result(self, r: TaskResult, now: float) -> CSEEffects:
        """A site's answer to a submit_model or validate task."""
        task = self.tasks.get(r.task_id)
        if self.phase != CSEPhase.RUNNING or task is None or r.task_name != task.name:
            log.info("job %s: ignoring a %s result from %s (task %s): not an open cross-site task", self.job_id,
                     r.task_name, r.site, r.task_id)
            return []
        if r.site not in task.outstanding:
            log.info("job %s: ignoring %s's second (or late) answer to %s %s", self.job_id, r.site, task.name,
                     task.owner or "")
            return []
        task.outstanding.discard(r.site)
        task.answered.add(r.site)
        if task.owner:
            return self._validated(task, r) + self._finish_if_done(now)
        return self._submitted(r, now) + self._submit_next(now) + self._finish_if_done(now)

    def on_tick(self, now: float, alive: Collection[str]) -> CSEEffects:
        """Time passed: begin once the participants are there; give up on silent sites and on timeouts."""
        self._alive = frozenset(alive)
        if self.phase == CSEPhase.WAITING:
            return self._try_begin(now)
        if self.phase != CSEPhase.RUNNING:
            return []
        for task in self.tasks.values():
            if not task.outstanding:
                continue
            if task.timeout > 0 and now - task.sent_at >= task.timeout:
                self._give_up(task, set(task.outstanding), f"no answer within {task.timeout:g} s")
            silent = {s for s in task.outstanding if s not in self._alive}
            if silent:
                self._give_up(task, silent, "stopped heartbeating")
        out: CSEEffects = []
        if self._to_submit and not any(t.outstanding for t in self.tasks.values() if not t.owner):
            out += self._submit_next(now)  # the site asked last was given up: the next one's turn
        return out + self._finish_if_done(now)

    def abort(self, reason: str, now: float) -> CSEEffects:
        """The admin aborted the job: the sites stop its work."""
        if self.phase == CSEPhase.DONE:
            return []
        self.phase, self.phase_since = CSEPhase.DONE, now
        out: CSEEffects = []
        if self.participants:
            out.append(ControlSites(self.participants, Control("abort", self.job_id)))
        return [*out, EndJob(ABORTED, reason)]

    # --- views -------------------------------------------------------------------------------

    def results(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The cross_val_results.json map: {data_client: {model_owner: {"accuracy": v}}}."""
        return ValidationJsonGenerator().generate(self.matrix)

    def record(self) -> dict[str, Any]:
        """What the job's record keeps of it (jobs.json, the job event's meta, hence the persistor's meta.json)."""
        return {"phase": self.phase.value, "participants": list(self.participants), "missing": list(self.missing),
                "models": list(self.models), "results": self.results(), "failures": list(self.failures)}

    def status(self, now: float) -> dict[str, Any]:
        """What `sagmq status JOB` shows of it."""
        waiting = {t.owner or t.name: sorted(t.outstanding) for t in self.tasks.values() if t.outstanding}
        return {"phase": self.phase.value, "participants": list(self.participants), "missing": list(self.missing),
                "models": list(self.models), "waiting_for": waiting, "results": self.results(),
                "failures": list(self.failures), "for_s": round(now - self.phase_since, 1)}

    def waiting_for(self, now: float) -> str:
        """In words, as the job's waiting_for."""
        if self.phase == CSEPhase.WAITING:
            return (f"sites: cross-site evaluation waits for participants "
                    f"{', '.join(self._absent()) or '(any site)'} (for {now - self.phase_since:.0f} s)")
        owed = sorted({s for t in self.tasks.values() for s in t.outstanding})
        return f"sites: cross-site evaluation results from {', '.join(owed)} (for {now - self.phase_since:.0f} s)"

    # --- steps -------------------------------------------------------------------------------

    def _absent(self) -> list[str]:
        return [s for s in self.cfg.participating_clients if s not in self._alive]

    def _try_begin(self, now: float) -> CSEEffects:
        waited = now - self.phase_since
        if self.cfg.participating_clients:
            absent = self._absent()
            if absent and waited < self.cfg.wait_for_clients_timeout:
                return []
            if absent:
                log.warning("job %s: participants %s did not appear within wait_for_clients_timeout (%g s): left out "
                            "of cross-site evaluation", self.job_id, ", ".join(absent),
                            self.cfg.wait_for_clients_timeout)
            self.missing = absent
            participants = [s for s in self.cfg.participating_clients if s not in absent]
        else:
            participants = sorted(s for s in self._alive if self.spec.site_allowed(s))
        if not participants:
            if waited < self.cfg.wait_for_clients_timeout:
                return []
            log.warning("job %s: no site available for cross-site evaluation within %g s: it ends without results",
                        self.job_id, self.cfg.wait_for_clients_timeout)
            return self._finish(now)
        return self._begin(tuple(participants), now)

    def _begin(self, participants: tuple[str, ...], now: float) -> CSEEffects:
        self.participants = participants
        self.phase, self.phase_since = CSEPhase.RUNNING, now
        log.info("job %s: cross-site evaluation begins with %s", self.job_id, ", ".join(participants))
        out: CSEEffects = []
        if self.cfg.submit_model_task_name:
            self._to_submit = list(participants)
            out += self._submit_next(now)
        for name, dxo in self._server_models.items():
            out.append(self._validate(name, dxo, now))
        self._server_models = {}  # sent: the server need not keep a copy
        return out + self._finish_if_done(now)

    def _submit_next(self, now: float) -> CSEEffects:
        """The submit_model task to every participant not asked yet, or to the next one (one at a time)."""
        if not self._to_submit:
            return []
        n = 1 if self.submit_one_at_a_time else len(self._to_submit)
        sites, self._to_submit = tuple(self._to_submit[:n]), self._to_submit[n:]
        cfg = self.cfg
        return [self._send(cfg.submit_model_task_name, "", DXO(WEIGHTS, {}, {SUBMIT_MODEL_NAME: BEST_MODEL}),
                           float(cfg.submit_model_timeout), now, sites)]

    def _send(self, name: str, owner: str, dxo: DXO, timeout: float, now: float,
              sites: tuple[str, ...] | None = None) -> SendTask:
        """One task to these sites, by default every participant (one publish, fanned out by the broker)."""
        task_id = uuid.uuid4().hex
        targets = tuple(self.participants) if sites is None else sites
        self.tasks[task_id] = _Task(task_id, name, owner, now, timeout, set(targets))
        sag = self.spec.sag
        msg = TrainTask(self.job_id, self.round, sag.num_rounds, sag.start_round, name, task_id, list(targets), dxo,
                        self.spec.deploy_map, self.apps, result_to=RESULT_TO_SERVER)
        return SendTask(targets, msg, timeout or None)

    def _validate(self, owner: str, model: DXO, now: float) -> SendTask:
        self.models.append(owner)
        log.info("job %s: sending %s's model to %s for validation", self.job_id, owner, ", ".join(self.participants))
        dxo = DXO(WEIGHTS, model.data, {**dict(model.meta), MODEL_OWNER: owner})
        return self._send(self.cfg.validation_task_name, owner, dxo, float(self.cfg.validation_timeout), now)

    def _submitted(self, r: TaskResult, now: float) -> CSEEffects:
        """A site's local model: validated by every participant, and kept by the persistor."""
        dxo = r.dxo
        if r.rc != RC_OK or dxo is None or dxo.kind != WEIGHTS or not dxo.data:
            why = (f"rc {r.rc}: {r.error}" if r.rc != RC_OK else
                   "no model" if dxo is None or not dxo.data else f"a {dxo.kind} DXO, not WEIGHTS")
            self._failed(r.site, "", f"submitted no model ({why}); it is not validated")
            return []
        log.info("job %s: received the local model of %s", self.job_id, r.site)
        out: CSEEffects = [self._validate(r.site, dxo, now)]
        if not self.cfg.cleanup_models:
            out.append(SaveCrossVal(CrossValSave(self.job_id, self.cfg.cross_val_dir, model_owner=r.site,
                                                 dxo=DXO(WEIGHTS, dxo.data))))
        return out

    def _validated(self, task: _Task, r: TaskResult) -> CSEEffects:
        """A site's result of validating one model."""
        dxo = r.dxo
        if r.rc != RC_OK or dxo is None or dxo.kind != METRICS:
            why = f"rc {r.rc}: {r.error}" if r.rc != RC_OK else f"a {'no' if dxo is None else dxo.kind} DXO, not METRICS"
            self._failed(r.site, task.owner, f"validating {task.owner}'s model gave no metrics ({why})")
            return []
        self.matrix.setdefault(r.site, {})[task.owner] = dxo
        log.info("job %s: %s validated %s's model: %s", self.job_id, r.site, task.owner, metrics_of(dxo))
        return []

    def _failed(self, site: str, owner: str, reason: str) -> None:
        log.warning("job %s: cross-site evaluation: %s %s", self.job_id, site, reason)
        self.failures.append({"site": site, "model_owner": owner, "reason": reason})

    def _give_up(self, task: _Task, sites: set[str], why: str) -> None:
        for site in sorted(sites):
            what = f"validating {task.owner}'s model" if task.owner else f"its {task.name} task"
            self._failed(site, task.owner, f"gave no answer to {what}: {why}")
        task.outstanding -= sites
        task.given_up |= sites

    def _finish_if_done(self, now: float) -> CSEEffects:
        if self.phase != CSEPhase.RUNNING or self._to_submit or any(t.outstanding for t in self.tasks.values()):
            return []
        return self._finish(now)

    def _finish(self, now: float) -> CSEEffects:
        """Every answer is in (or given up): the matrix to the persistor, then the job ends behind it."""
        self.phase, self.phase_since = CSEPhase.DONE, now
        results = self.results()
        if self.cfg.formatter:
            log.info("job %s: cross-site validation results:\n%s", self.job_id, NPFormatter().format(self.matrix))
        log.info("job %s: cross-site evaluation done: %d result(s), %d failure(s)", self.job_id,
                 sum(len(v) for v in results.values()), len(self.failures))
        save = CrossValSave(self.job_id, self.cfg.cross_val_dir, results_path=self.cfg.json_path, results=results)
        return [SaveCrossVal(save), EndJob(FINISHED, "", ordered=True)]
