"""The server on a memory bus: a submitted job, two sites heartbeating, model.load, then the tasks."""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import numpy as np

from sagmq.job.examples import example_job
from sagmq.job.spec import read_job_folder
from sagmq.memory import MemoryBroker
from sagmq.server.main import ServerService
from sagmq.wire.codec import DXO, WEIGHTS
from sagmq.wire.messages import (
    AdminReply,
    AdminRequest,
    ClientHeartbeat,
    JobEvent,
    ModelLoad,
    ModelLoaded,
    RoundOpen,
    TrainTask,
)
from sagmq.wire.settings import Settings
from sagmq.wire.topology import RK_ADMIN_SERVER, RK_HEARTBEAT, RK_MODEL_LOADED, site_topology
from tests.unit.choreography.harness import LIMIT, Probe, running, service_bus

SITES = ("site-1", "site-2")


def beat(probe: Probe, site: str) -> None:
    """A site's hello heartbeat."""
    hb = ClientHeartbeat(site, True, "host", os.getpid(), False)
    probe.bus.publish(probe.names.events, RK_HEARTBEAT, hb, headers={"site": site}, advisory=True)


def test_a_job_loads_its_model_then_sends_the_task_to_both_sites(broker: MemoryBroker, settings: Settings) -> None:
    probe = Probe(broker, settings)
    for site in SITES:
        broker.declare(site_topology(settings.prefix, site))
    with running(broker, lambda b: ServerService(settings, b), service_bus(broker, settings, "server")):
        for site in SITES:
            beat(probe, site)
        req = AdminRequest("submit", files=read_job_folder(example_job("hello-numpy-sag")))
        reply = probe.bus.rpc(probe.names.admin, RK_ADMIN_SERVER, req, 5.0).message(AdminReply, LIMIT)
        assert reply.ok, reply.error
        job = str(reply.result["job_id"])
        assert probe.first(JobEvent, lambda e: e.job_id == job).status == "submitted"

        load = probe.first(ModelLoad, lambda m: m.job_id == job)
        initial = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], np.float32)
        loaded = ModelLoaded(job, "default", DXO(WEIGHTS, {"numpy_key": initial}))
        probe.bus.publish(probe.names.events, RK_MODEL_LOADED, loaded, headers={"job_id": load.job_id})

        opened = probe.first(RoundOpen, lambda m: m.job_id == job)
        assert opened.round == 0 and sorted(opened.targets) == list(SITES)
        for site in SITES:  # one publish, fanned out by CC to every target's queue
            queue = probe.names.site_queue(site)
            tasks = probe.wait(partial(probe.bus.browse, queue), f"the task in {queue}")
            (task,) = [d.message(TrainTask, LIMIT) for d in tasks]
            assert (task.job_id, task.round, task.task_id, task.task_name) == (job, 0, opened.task_id, "train")
            assert sorted(task.targets) == list(SITES) and np.array_equal(task.dxo.data["numpy_key"], initial)


def test_a_round_open_the_broker_refuses_is_sent_again(broker: MemoryBroker, settings: Settings) -> None:
    """A nack (a quorum queue without a leader while a cluster node fails over) does not lose round.open:
    the server sends it again, and the aggregator gets it."""
    from sagmq.wire.errors import BrokerRefused

    probe = Probe(broker, settings)
    for site in SITES:
        broker.declare(site_topology(settings.prefix, site))
    bus = service_bus(broker, settings, "server")
    real_send, refused = bus.send, []

    def send(exchange: str, routing_key: str, msg: Any, *args: Any, **kw: Any) -> None:
        if isinstance(msg, RoundOpen) and len(refused) < 2:  # the first two tries are nacked
            refused.append(msg)
            on_done = kw.get("on_done")
            assert on_done is not None
            bus.call_threadsafe(lambda: on_done(BrokerRefused("the broker refused round.open (nack)")))
            return
        real_send(exchange, routing_key, msg, *args, **kw)

    bus.send = send  # type: ignore[method-assign]
    with running(broker, lambda b: ServerService(settings, b), bus):
        for site in SITES:
            beat(probe, site)
        req = AdminRequest("submit", files=read_job_folder(example_job("hello-numpy-sag")))
        reply = probe.bus.rpc(probe.names.admin, RK_ADMIN_SERVER, req, 5.0).message(AdminReply, LIMIT)
        job = str(reply.result["job_id"])
        load = probe.first(ModelLoad, lambda m: m.job_id == job)
        initial = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], np.float32)
        loaded = ModelLoaded(job, "default", DXO(WEIGHTS, {"numpy_key": initial}))
        probe.bus.publish(probe.names.events, RK_MODEL_LOADED, loaded, headers={"job_id": load.job_id})
        opened = probe.first(RoundOpen, lambda m: m.job_id == job)
        assert opened.round == 0 and len(refused) == 2
