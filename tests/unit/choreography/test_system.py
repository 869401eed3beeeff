"""The whole system on one memory broker: server, aggregator, persistor and two sites, each on a
thread of its own, run hello-numpy-sag to its final model."""

from __future__ import annotations

import io
from contextlib import ExitStack
from functools import partial

import numpy as np

from sagmq.aggregator.main import AggregatorService
from sagmq.client.main import ClientService
from sagmq.job.examples import example_job
from sagmq.job.spec import read_job_folder
from sagmq.memory import MemoryBroker
from sagmq.persistor.main import PersistorService
from sagmq.server.main import ServerService
from sagmq.wire.messages import FINISHED, AdminReply, AdminRequest, JobEvent
from sagmq.wire.settings import Settings
from sagmq.wire.topology import RK_ADMIN_PERSISTOR, RK_ADMIN_SERVER
from tests.unit.choreography.harness import LIMIT, Probe, running, service_bus

FINAL = np.array([[4, 5, 6], [7, 8, 9], [10, 11, 12]], np.float32)


def test_hello_numpy_sag_runs_to_its_final_model(broker: MemoryBroker, settings: Settings) -> None:
    probe = Probe(broker, settings)
    with ExitStack() as stack:
        stack.enter_context(running(broker, lambda b: PersistorService(settings, b),
                                    service_bus(broker, settings, "persistor")))
        stack.enter_context(running(broker, lambda b: AggregatorService(settings, b, grace_s=1.0),
                                    service_bus(broker, settings, "aggregator")))
        for name in ("site-1", "site-2"):
            site = settings.with_site(name)
            stack.enter_context(running(broker, partial(ClientService, site),
                                        service_bus(broker, site, f"client-{name}", service_topology_too=False)))
        stack.enter_context(running(broker, lambda b: ServerService(settings, b),
                                    service_bus(broker, settings, "server")))

        req = AdminRequest("submit", files=read_job_folder(example_job("hello-numpy-sag")))
        reply = probe.bus.rpc(probe.names.admin, RK_ADMIN_SERVER, req, 5.0).message(AdminReply, LIMIT)
        assert reply.ok, reply.error
        job = str(reply.result["job_id"])
        ended = probe.first(JobEvent, lambda e: e.job_id == job and e.status not in ("submitted", "running"),
                            timeout=20.0)
        assert ended.status == FINISHED, ended.reason
        assert [h["round"] for h in ended.history] == [0, 1, 2]

        saved = settings.workspace / "persistor" / "jobs" / job / "models" / "server.npy"
        assert np.array_equal(np.load(saved), FINAL)
        down = probe.bus.rpc(probe.names.admin, RK_ADMIN_PERSISTOR, AdminRequest("download", {"job_id": job}), 5.0)
        files = down.message(AdminReply, LIMIT).files
        assert np.array_equal(np.load(io.BytesIO(files["models/server.npy"])), FINAL)
    assert probe.bus.dead_lettered == 0 and not [d for d in probe.got if d.exchange == probe.names.dead]
