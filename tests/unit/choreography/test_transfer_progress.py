"""Transfer progress on a memory bus: a site's heartbeat tells the bytes of its task (whole, at once for
a large one) and of one still arriving; the server's status adds them up for the open round."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np

from sagmq.client.main import ClientService
from sagmq.job.examples import example_job
from sagmq.job.spec import parse_job, read_job_folder
from sagmq.memory import MemoryBroker
from sagmq.runtime.metrics import Meter
from sagmq.server.main import ServerService
from sagmq.wire.codec import DXO, WEIGHTS
from sagmq.wire.messages import (
    AdminReply,
    AdminRequest,
    ClientHeartbeat,
    ModelLoad,
    ModelLoaded,
    RoundOpen,
    TrainTask,
)
from sagmq.wire.settings import Settings
from sagmq.wire.topology import RK_ADMIN_SERVER, RK_HEARTBEAT, RK_MODEL_LOADED, site_topology
from tests.unit.choreography.harness import LIMIT, Probe, running, service_bus

JOB = "d" * 32
MODEL = np.zeros(2**19, np.float32)  # 2 MiB


def test_a_site_tells_a_large_task_at_once_and_bytes_still_arriving(broker: MemoryBroker,
                                                                    settings: Settings) -> None:
    site = replace(settings.with_site("site-1"), heartbeat_s=60.0)  # only the hello, then what a task triggers
    probe = Probe(broker, settings)
    spec = parse_job(read_job_folder(example_job("hello-numpy-sag")))
    bus = service_bus(broker, site, "client-site-1", service_topology_too=False)
    meter = Meter("client", "site-1")
    bus.meter = meter  # type: ignore[attr-defined]  # (what an AmqpBus has: it counts what arrives)
    with running(broker, lambda b: ClientService(site, b), bus) as svc:
        hello = probe.first(ClientHeartbeat)
        assert (hello.task_id, hello.task_bytes, hello.receiving_bytes) == ("", 0, 0)
        task = TrainTask(JOB, 0, 3, 0, "train", "task-0", ["site-1"], DXO(WEIGHTS, {"w": MODEL}), spec.deploy_map,
                         spec.client_apps())
        meter.count_received(TrainTask.TYPE, MODEL.nbytes)  # (the memory bus counts nothing itself)
        probe.bus.publish(probe.names.tasks, "site-1", task, headers={"job_id": JOB, "round": 0})
        told = probe.first(ClientHeartbeat, lambda h: h.task_id == "task-0")
        assert (told.task_bytes, told.receiving_bytes) == (MODEL.nbytes, 0)  # whole: nothing arriving now
        assert isinstance(svc, ClientService)
        meter.count_received(TrainTask.TYPE, 3 * 2**20)  # parts of the next task, as the bus counts them
        meter.count_received("control", 10**6)  # not a model
        svc.bus.call_threadsafe(svc.beat)  # the next heartbeat (on the site's own thread)
        arriving = probe.first(ClientHeartbeat, lambda h: h.receiving_bytes > 0)
        assert (arriving.task_id, arriving.task_bytes, arriving.receiving_bytes) == ("task-0", MODEL.nbytes, 3 * 2**20)


def beat(probe: Probe, site: str, task_id: str = "", task_bytes: int = 0, receiving: int = 0) -> None:
    hb = ClientHeartbeat(site, not task_id and not receiving, "host", os.getpid(), False, task_id=task_id,
                         task_bytes=task_bytes, receiving_bytes=receiving)
    probe.bus.publish(probe.names.events, RK_HEARTBEAT, hb, headers={"site": site}, advisory=True)


def test_the_server_adds_up_the_sites_bytes_for_the_open_round(broker: MemoryBroker, settings: Settings) -> None:
    probe = Probe(broker, settings)
    sites = ("site-1", "site-2", "site-3")
    for site in sites:
        broker.declare(site_topology(settings.prefix, site))
    files = read_job_folder(example_job("hello-numpy-sag"))
    with running(broker, lambda b: ServerService(settings, b), service_bus(broker, settings, "server")):
        for site in sites:
            beat(probe, site)

        def status(job: str) -> dict[str, object]:
            r = probe.bus.rpc(probe.names.admin, RK_ADMIN_SERVER, AdminRequest("status", {"job_id": job}), 5.0)
            reply = r.message(AdminReply, LIMIT)
            assert reply.ok, reply.error
            return reply.result

        reply = probe.bus.rpc(probe.names.admin, RK_ADMIN_SERVER, AdminRequest("submit", files=files), 5.0)
        job = str(reply.message(AdminReply, LIMIT).result["job_id"])
        load = probe.first(ModelLoad, lambda m: m.job_id == job)
        loaded = ModelLoaded(job, "default", DXO(WEIGHTS, {"numpy_key": MODEL}))
        probe.bus.publish(probe.names.events, RK_MODEL_LOADED, loaded, headers={"job_id": load.job_id})
        opened = probe.first(RoundOpen, lambda m: m.job_id == job)
        targets = sorted(opened.targets)
        size = MODEL.nbytes
        first = status(job)["transfer"]
        assert first == {"round": 0, "task_bytes": size, "targets": len(targets), "sites_received": 0,
                         "received_bytes": 0, "total_bytes": size * len(targets), "results": 0}
        beat(probe, targets[0], opened.task_id, size)  # whole
        beat(probe, targets[1], "an-older-task", size, receiving=size // 4)  # a quarter of this round's so far
        want = size + size // 4

        def moved() -> dict[str, object] | None:
            t = status(job)["transfer"]
            assert isinstance(t, dict)
            return t if t["received_bytes"] == want else None
        t = probe.wait(moved, "the heartbeats to count")
        assert t["sites_received"] == 1 and t["total_bytes"] == size * len(targets)
