"""A site on a memory bus: heartbeats, and a train task answered with NPTrainer's result."""

from __future__ import annotations

import numpy as np

from sagmq.client.main import ClientService
from sagmq.job.examples import example_job
from sagmq.job.spec import parse_job, read_job_folder
from sagmq.memory import MemoryBroker
from sagmq.wire.codec import DXO, WEIGHTS
from sagmq.wire.messages import RC_OK, ClientHeartbeat, TaskResult, TrainTask
from sagmq.wire.settings import Settings
from tests.unit.choreography.harness import Probe, running, service_bus

JOB = "c" * 32


def test_a_train_task_comes_back_with_every_weight_plus_one(broker: MemoryBroker, settings: Settings) -> None:
    site = settings.with_site("site-1")
    probe = Probe(broker, settings)
    spec = parse_job(read_job_folder(example_job("hello-numpy-sag")))
    bus = service_bus(broker, site, "client-site-1", service_topology_too=False)
    with running(broker, lambda b: ClientService(site, b), bus):
        hello = probe.first(ClientHeartbeat)
        assert hello.site == "site-1" and hello.hello
        w: dict[str, np.ndarray] = {"numpy_key": np.arange(9, dtype=np.float32).reshape(3, 3), "b": np.ones(2, np.float64)}
        task = TrainTask(JOB, 0, 3, 0, "train", "task-0", ["site-1", "site-2"],
                         DXO(WEIGHTS, w, {"current_round": 0, "num_rounds": 3}), spec.deploy_map, spec.client_apps())
        probe.bus.publish(probe.names.tasks, "site-1", task, headers={"job_id": JOB, "round": 0})
        r = probe.first(TaskResult)
        assert (r.job_id, r.round, r.task_id, r.site, r.rc) == (JOB, 0, "task-0", "site-1", RC_OK)
        assert r.dxo is not None and r.dxo.kind == WEIGHTS
        for k, v in w.items():
            assert r.dxo.data[k].dtype == v.dtype and np.array_equal(r.dxo.data[k], v + 1.0)
        assert probe.wait(lambda: len(probe.all(ClientHeartbeat)) >= 2, "a second heartbeat")
