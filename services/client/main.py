"""The client service: one site, consuming its queue, training off the I/O thread."""

from __future__ import annotations

import argparse
import logging
import os
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from sagmq.client.api import TaskContext, TaskError
from sagmq.client.apps import App, deploy
from sagmq.filters.base import TASK_DATA, TASK_RESULT
from sagmq.runtime.lifecycle import serve
from sagmq.runtime.metrics import meter_of
from sagmq.storage.files import shared_saver
from sagmq.wire.bus import Bus, Delivery
from sagmq.wire.codec import DXO, WEIGHTS
from sagmq.wire.errors import EXIT_FAILED, Rejected, SagmqError
from sagmq.wire.messages import (
    RC_EXECUTION_EXCEPTION,
    RC_OK,
    RC_TASK_UNKNOWN,
    RESULT_TO_SERVER,
    ClientHeartbeat,
    Control,
    RoundAggregated,
    TaskResult,
    TrainTask,
)
from sagmq.wire.settings import SITE_NUMBER, Settings, default_site_name, load_settings
from sagmq.wire.topology import RK_HEARTBEAT, RK_RESULT, RK_RESULT_SERVER, site_topology

log = logging.getLogger(__name__)
LARGE_RESULT_BYTES = 2**20  # a result this large makes the next task wait for its confirm
LARGE_RESULT_WAIT_S = 60.0
LOCAL_SAVE_FLUSH_S = 30.0  # on the way out, how long a site waits for its executors' local saves to be written


def flush_local_saves() -> None:
    """On the way out: let the local saves still waiting for the process's writer thread reach the disk."""
    if not shared_saver().flush(timeout_s=LOCAL_SAVE_FLUSH_S):
        log.warning("local model saves not written within %g s of stopping", LOCAL_SAVE_FLUSH_S)


@dataclass(slots=True)
class _Work:
    task: TrainTask
    ctx: TaskContext


@dataclass(slots=True)
class ClientState:
    """What the I/O thread and the worker share (guarded by lock)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    current: _Work | None = None
    queued: int = 0  # tasks handed to the worker and not finished yet
    apps: dict[str, App] = field(default_factory=dict)
    aborted_jobs: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Forwarded:
    """An aggregate the aggregator forwarded as this site's next model, held unacked until a task names it."""

    delivery: Delivery
    agg: RoundAggregated


class Pool(Protocol):
    """Worker threads shared by the sites of one process (sagmq.client.multisite.SerialPool)."""

    def submit(self, key: str, fn: Callable[[], None]) -> None:
        """Run fn on a pool thread, after whatever was submitted before under the same key."""


class ClientService:
    """Receives tasks, runs them in a worker thread, publishes results.

    Alone, a site has a worker thread of its own and stop event; many sites in one process
    (sagmq.client.multisite) share one bus, one stop event and one small pool of workers."""

    def __init__(self, settings: Settings, bus: Bus, pool: Pool | None = None,
                 stop: threading.Event | None = None) -> None:
        self.s = settings
        self.site = settings.site
        self.bus = bus
        self.stop = threading.Event() if stop is None else stop
        self.pool = pool
        # sees every delivery first: a multi-site process gives the sites one copy of a body they all got
        self.intake: Callable[[Delivery], None] | None = None
        self.state = ClientState()
        self.work: queue.Queue[_Work | None] = queue.Queue()
        self.outbox: queue.Queue[TaskResult] = queue.Queue()
        self.workspace = settings.workspace / self.site
        self._hello = True
        self._next_beat = 0.0
        self.received: tuple[str, int] = ("", 0)  # I/O thread only: the last task received whole, its array bytes
        # alone in its process, a site's bus counts (runtime.metrics) the bytes of tasks and forwarded models as
        # their parts arrive: what came since the last whole task is the next one arriving (its heartbeat says)
        self._meter = meter_of(bus) if pool is None else None
        self._arrived_before = 0
        # I/O thread only: forwarded models by job, tasks waiting for theirs, ids of tasks already queued
        self.forwarded: dict[str, _Forwarded] = {}
        self.waiting: dict[str, TrainTask] = {}
        self.seen_tasks: deque[str] = deque(maxlen=32)
        # I/O thread only: task id -> the routing key its result goes with (cross-site tasks: to the server)
        self.result_keys: dict[str, str] = {}
        # large results handed to the bus and not yet confirmed: the next task waits for them (see _worker)
        self.large_unconfirmed = 0
        self.results_settled = threading.Condition(self.state.lock)
        bus.on_reconnect.append(self.forwarded.clear)  # held deliveries come again on the new channel
        self.worker = threading.Thread(target=self._worker, name="trainer", daemon=True)

    def start(self) -> None:
        """Declare the site queue and start consuming."""
        self.bus.declare(site_topology(self.s.prefix, self.site, self.s))
        # unlimited prefetch: a large task arrives in parts that are held until all are in (tasks are
        # acked on receipt and queued for the worker, so nothing is hoarded beyond what the queue holds)
        self.bus.consume(self.bus.names.site_queue(self.site), self.on_message, prefetch=0)
        if self.pool is None:
            self.worker.start()

    def run(self) -> None:
        """Serve until stopped."""
        self.start()
        log.info("site %s ready (custom code %s)", self.site, "allowed" if self.s.allow_custom_code else "refused")
        try:
            self.bus.run(self.stop, self.tick, 0.1)
        finally:
            self.work.put(None)
            with self.state.lock:
                if self.state.current:
                    self.state.current.ctx.abort.set()
            flush_local_saves()

    def flush_results(self) -> None:
        """Publish finished results (on the I/O thread); one that cannot go now is kept for later."""
        while True:
            try:
                r = self.outbox.get_nowait()
            except queue.Empty:
                return
            try:
                self._publish_result(r)
            except Exception:
                self.outbox.put(r)
                raise

    def tick(self) -> None:
        """Send pending results, and a heartbeat every heartbeat_s seconds."""
        if not self.outbox.empty():
            self.flush_results()
        now = time.monotonic()
        if now < self._next_beat:
            return
        self._next_beat = now + self.s.heartbeat_s
        self.beat()

    def beat(self) -> None:
        """A heartbeat; it names a task waiting for a forwarded model, so the server sends it whole."""
        with self.state.lock:
            cur = self.state.current
        missing = next(iter(self.waiting.values())).task_id if self.waiting else ""
        hb = ClientHeartbeat(
            site=self.site, hello=self._hello, host=socket.gethostname(), pid=os.getpid(),
            allow_custom_code=self.s.allow_custom_code,
            busy_job=cur.task.job_id if cur else "", busy_round=cur.task.round if cur else -1,
            missing_model=missing, task_id=self.received[0], task_bytes=self.received[1],
            receiving_bytes=max(0, self._arrived() - self._arrived_before),
        )
        self.bus.publish(self.bus.names.events, RK_HEARTBEAT, hb, headers={"site": self.site}, advisory=True)
        self._hello = False

    def _arrived(self) -> int:
        """Body bytes of tasks and forwarded models (parts included) this process's bus received so far."""
        if self._meter is None:
            return 0
        got = self._meter.received
        return sum(got[k][1] for k in (TrainTask.TYPE, RoundAggregated.TYPE) if k in got)

    def on_message(self, d: Delivery) -> None:
        """A task or a control message from the site queue."""
        if self.intake is not None:
            self.intake(d)
        limit = self.s.max_body_bytes
        if d.msg_type == Control.TYPE:
            self.on_control(d.message(Control, limit))
        elif d.msg_type == TrainTask.TYPE:
            task = d.message(TrainTask, limit)
            if self.site not in task.targets:
                raise Rejected(f"task {task.task_id} of job {task.job_id} is not addressed to site {self.site}")
            if task.result_to not in ("", RESULT_TO_SERVER):
                raise Rejected(f"task {task.task_id} of job {task.job_id} sends its result to {task.result_to!r}: "
                               f"a site answers to the aggregator ('') or to {RESULT_TO_SERVER!r}")
            self.on_train_task(task)
        elif d.msg_type == RoundAggregated.TYPE:
            self.on_forwarded(d)
        else:
            raise Rejected(f"a site queue takes task, control and forwarded aggregate messages, not {d.msg_type!r}")

    def on_train_task(self, task: TrainTask) -> None:
        """A task carrying its model, or naming the forwarded aggregate that is its model."""
        if task.task_id in self.seen_tasks:
            log.info("task %s of round %d of job %s is here already; ignoring this copy", task.task_id, task.round,
                     task.job_id)
            return
        job = task.job_id
        if task.model_from:
            fwd = self.forwarded.get(job)
            if fwd is None or fwd.agg.task_id != task.model_from:
                self.waiting[job] = task
                log.warning("task of round %d of job %s names the aggregate of task %s, which this site does not "
                            "have: asking the server for the whole task", task.round, job, task.model_from)
                self.beat()
                return
            self._let_go_forwarded(job)
            assert fwd.agg.dxo is not None
            task = replace(task, dxo=DXO(WEIGHTS, fwd.agg.dxo.data, task.dxo.meta))
        else:
            self._let_go_forwarded(job)  # a task that carries its model: a held aggregate is of no further use
        self.waiting.pop(job, None)
        self.seen_tasks.append(task.task_id)
        # the task's bytes, told in heartbeats (transfer progress); a large one's at once, a small one's with the next
        self.received = (task.task_id, sum(a.nbytes for a in task.dxo.data.values()))
        self._arrived_before = self._arrived()
        if self.received[1] >= LARGE_RESULT_BYTES:
            self.beat()
        if task.result_to == RESULT_TO_SERVER:
            self.result_keys[task.task_id] = RK_RESULT_SERVER
        self.on_task(task)

    def on_forwarded(self, d: Delivery) -> None:
        """The aggregate of a round this site took part in, forwarded by the aggregator: the model of the
        job's next task, which will name it. Held unacked until then (a newer one replaces it)."""
        if d.user_id not in (self.s.amqp_user, self.s.aggregator_user):
            raise Rejected(f"spoofed sender: user {d.user_id!r} forwarded an aggregate (only the aggregator's user "
                           f"{self.s.aggregator_user!r} may)")
        agg = d.message(RoundAggregated, self.s.max_body_bytes)
        if self.site not in agg.accepted:
            raise Rejected(f"aggregate of round {agg.round} of job {agg.job_id} forwarded to {self.site}, "
                           f"which is not among its contributors")
        if agg.dxo is None or agg.dxo.kind != WEIGHTS or not agg.task_id:
            raise Rejected(f"forwarded aggregate of round {agg.round} of job {agg.job_id} carries no WEIGHTS "
                           f"or no task id")
        if agg.job_id in self.state.aborted_jobs:
            return
        self._let_go_forwarded(agg.job_id)
        d.deferred = True
        self.forwarded[agg.job_id] = _Forwarded(d, agg)
        log.info("aggregate of round %d of job %s held as the next model", agg.round, agg.job_id)
        task = self.waiting.get(agg.job_id)
        if task is not None and task.model_from == agg.task_id:
            self.on_train_task(task)

    def _let_go_forwarded(self, job: str) -> None:
        """Stop holding the job's forwarded aggregate, if any: acked, the broker drops it."""
        fwd = self.forwarded.pop(job, None)
        if fwd is not None:
            self.bus.ack(fwd.delivery)

    def on_task(self, task: TrainTask) -> None:
        """Queue a task; a newer round of the same job supersedes the one running."""
        ctx = TaskContext(self.site, task.job_id, task.round, task.num_rounds, task.task_name, self.workspace)
        with self.state.lock:
            cur = self.state.current
            if cur and cur.task.job_id == task.job_id and cur.task.round < task.round:
                log.info("round %d of job %s supersedes round %d; stopping it", task.round, task.job_id, cur.task.round)
                cur.ctx.abort.set()
        log.info("task %s round %d of job %s received", task.task_name, task.round, task.job_id)
        w = _Work(task, ctx)
        if self._quick(task):
            self._run_here(w)
            return
        with self.state.lock:
            self.state.queued += 1
        if self.pool is None:
            self.work.put(w)
        else:
            self.pool.submit(self.site, lambda: self._work_one(w))

    def _quick(self, task: TrainTask) -> bool:
        """A task its (deployed) executor calls quick, with the worker idle: run on this thread."""
        with self.state.lock:
            if self.state.queued or task.job_id in self.state.aborted_jobs:
                return False
            app = self.state.apps.get(task.job_id)
        executor = app.executors.get(task.task_name) if app is not None else None
        try:
            return executor is not None and bool(executor.quick(task.task_name, task.dxo))
        except Exception:  # the job's code: a broken quick() just means the worker runs it
            log.exception("executor %s: quick() failed", type(executor).__name__)
            return False

    def _run_here(self, w: _Work) -> None:
        """Run a quick task on the I/O thread and send its result at once."""
        with self.state.lock:
            self.state.current = w
        self._run_current(w)
        self.flush_results()

    def _run_current(self, w: _Work) -> None:
        """Run the site's current task (state.current, set by the caller); its result goes to the outbox."""
        try:
            result = self._run(w)
        finally:
            with self.state.lock:
                self.state.current = None
        self.outbox.put(result)

    def on_control(self, c: Control) -> None:
        """Abort a job's work, or shut down."""
        if c.command == "abort":
            with self.state.lock:
                self.state.aborted_jobs.add(c.job_id)
                cur = self.state.current
                if cur and cur.task.job_id == c.job_id:
                    cur.ctx.abort.set()
            self.waiting.pop(c.job_id, None)
            self._let_go_forwarded(c.job_id)
            log.info("job %s aborted by the server", c.job_id)
        elif c.command == "shutdown":
            log.info("shutdown requested by the server")
            self.stop.set()
        else:
            raise Rejected(f"unknown control command {c.command!r}")

    # --- worker thread ----------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            w = self.work.get()
            if w is None:
                return
            self._work_one(w)
            del w  # the next task may be a whole model: do not keep this one's alive meanwhile

    def _work_one(self, w: _Work) -> None:
        """Run one queued task (on the site's worker thread, or a pool thread), then send its result."""
        with self.state.lock:
            if w.task.job_id in self.state.aborted_jobs:
                self.state.queued -= 1
                return
            # A forwarded model can arrive while the site's last large result still waits for the
            # broker's confirm (kept in memory to send again after a lost connection): training now
            # would hold three models at once. Waiting for the confirm keeps it to two.
            if not self.results_settled.wait_for(lambda: self.large_unconfirmed == 0, LARGE_RESULT_WAIT_S):
                log.warning("round %d of job %s starts before the last result was confirmed (%g s)",
                            w.task.round, w.task.job_id, LARGE_RESULT_WAIT_S)
            self.state.current = w
        self._run_current(w)
        with self.state.lock:
            self.state.queued -= 1
        try:
            self.bus.call_threadsafe(self.flush_results)
        except SagmqError:
            pass  # not connected right now: the I/O thread's tick sends it after reconnecting

    def _run(self, w: _Work) -> TaskResult:
        t = w.task

        def result(rc: str, dxo: DXO | None = None, error: str = "") -> TaskResult:
            return TaskResult(job_id=t.job_id, round=t.round, task_name=t.task_name, task_id=t.task_id,
                              site=self.site, rc=rc, dxo=dxo, error=error)

        started = time.monotonic()
        try:
            key = f"{t.job_id}"
            app = self.state.apps.get(key)
            if app is None:
                app = deploy(self.site, t.job_id, t.deploy_map, t.apps, self.workspace, self.s.allow_custom_code)
                self.state.apps = {key: app}  # one job at a time; drop older jobs' executors
            executor = app.executors.get(t.task_name)
            if executor is None:
                raise TaskError(RC_TASK_UNKNOWN, f"app {app.name} has no executor for task {t.task_name!r}")
            w.ctx.workdir = app.workdir
            # the site's filters: task_data before the executor sees the task, task_result before it leaves
            dxo = executor.execute(t.task_name, app.filtered(TASK_DATA, self.site, t.job_id, t.round, t.task_name,
                                                             t.dxo), w.ctx)
            dxo = app.filtered(TASK_RESULT, self.site, t.job_id, t.round, t.task_name, dxo)
            log.info("task %s round %d of job %s done in %.3f s", t.task_name, t.round, t.job_id,
                     time.monotonic() - started)
            return result(rc=RC_OK, dxo=dxo)
        except TaskError as e:
            log.warning("task %s round %d of job %s failed: %s: %s", t.task_name, t.round, t.job_id, e.rc, e.text)
            return result(rc=e.rc, error=e.text)
        except Exception as e:  # executor code is the job's; report, don't die
            log.exception("executor failed on round %d of job %s", t.round, t.job_id)
            return result(rc=RC_EXECUTION_EXCEPTION, error=f"{type(e).__name__}: {e}")

    def _publish_result(self, r: TaskResult) -> None:
        headers = {"job_id": r.job_id, "round": r.round, "site": self.site}
        large = r.dxo is not None and sum(a.nbytes for a in r.dxo.data.values()) >= LARGE_RESULT_BYTES

        def sent(err: SagmqError | None) -> None:
            if large:
                with self.state.lock:
                    self.large_unconfirmed -= 1
                    self.results_settled.notify_all()
            if err is None:
                log.info("result of round %d of job %s sent (rc %s)", r.round, r.job_id, r.rc)
            else:
                log.error("result of round %d of job %s not delivered: %s", r.round, r.job_id, err)
                if r.task_id in self.seen_tasks:  # the server sends the task again to a site that owes it: run it
                    self.seen_tasks.remove(r.task_id)

        # not waiting for the broker (a lost connection sends it again); the loop keeps heartbeating
        rk = self.result_keys.get(r.task_id, RK_RESULT)
        self.bus.send(self.bus.names.results, rk, r, headers=headers, on_done=sent)
        self.result_keys.pop(r.task_id, None)  # (kept while a failed send leaves the result to go again)
        if large:  # (sent() runs later, on this thread)
            with self.state.lock:
                self.large_unconfirmed += 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of `sagmq client`."""
    p = argparse.ArgumentParser(prog="sagmq client", description="Run one site.")
    p.add_argument("--site", help="site name (default: SAGMQ_SITE, then the hostname)")
    p.add_argument("--allow-custom-code", action="store_true", help="run code from a job's app/custom/")
    p.add_argument("--sites", help="many sites in this process over one connection (simulation): a range "
                   "site-1..site-500, a comma list, or a count N named with --site-prefix")
    p.add_argument("--site-prefix", default="site-", help="names of --sites N: PREFIX1 .. PREFIXN (default: site-)")
    p.add_argument("--workers", type=int, help="with --sites: worker threads shared by the sites (default: "
                   "the cores, at most 4)")
    args = p.parse_args(argv)
    settings = load_settings()
    if args.sites:
        from sagmq.client.multisite import parse_sites, serve_sites  # (it imports this module)

        if args.site:
            p.error("--site and --sites exclude each other")
        settings = replace(settings, allow_custom_code=settings.allow_custom_code or args.allow_custom_code)
        return serve_sites(settings, parse_sites(args.sites, args.site_prefix), args.workers)
    site = args.site or settings.site or default_site_name()
    if SITE_NUMBER not in site:
        settings = settings.with_site(site)
    else:  # site-{n}: the lowest free number, held while this process lives (sagmq.amqp.claim)
        from sagmq.amqp.claim import SiteClaim

        claim = SiteClaim(settings)
        settings = settings.with_site(claim.claim(site))
    if args.allow_custom_code:
        settings = replace(settings, allow_custom_code=True)
    if SITE_NUMBER not in site:
        return serve("client", ClientService, settings=settings, service_topology_too=False, keep_freed=True)
    try:
        code = serve("client", ClientService, settings=settings, service_topology_too=False, keep_freed=True,
                     on_start=lambda svc: claim.watch(svc.stop.set))
    finally:
        claim.close()
    return EXIT_FAILED if claim.lost else code
