"""hello-numpy-cross-val on one memory broker: ScatterAndGather, then CrossSiteModelEval in the same job,
with the server, aggregator, persistor and two sites each on a thread of its own."""

from __future__ import annotations

import io
import json
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from sagmq.aggregator.main import AggregatorService
from sagmq.client.main import ClientService
from sagmq.job.examples import example_job
from sagmq.job.spec import read_job_folder
from sagmq.memory import MemoryBroker
from sagmq.persistor.main import PersistorService
from sagmq.server.main import ServerService
from sagmq.wire.codec import METRICS, WEIGHTS
from sagmq.wire.messages import (
    FINISHED,
    AdminReply,
    AdminRequest,
    ClientHeartbeat,
    CrossValSave,
    JobEvent,
    TaskResult,
    TrainTask,
)
from sagmq.wire.settings import Settings
from sagmq.wire.topology import RK_ADMIN_PERSISTOR, RK_ADMIN_SERVER, RK_RESULT, RK_RESULT_SERVER
from tests.unit.choreography.harness import LIMIT, Probe, running, service_bus

FINAL = np.array([[4, 5, 6], [7, 8, 9], [10, 11, 12]], np.float32)
SITES = ("site-1", "site-2")
SFILE = "app/config/config_fed_server.json"
CFILE = "app/config/config_fed_client.json"


def test_hello_numpy_cross_val_gives_the_full_matrix(broker: MemoryBroker, settings: Settings) -> None:
    n = settings.prefix
    probe = Probe(broker, settings, also=((f"{n}.results", RK_RESULT_SERVER), (f"{n}.tasks", "site-1")))
    with ExitStack() as stack:
        stack.enter_context(running(broker, lambda b: PersistorService(settings, b),
                                    service_bus(broker, settings, "persistor")))
        stack.enter_context(running(broker, lambda b: AggregatorService(settings, b, grace_s=1.0),
                                    service_bus(broker, settings, "aggregator")))
        for name in SITES:
            site = settings.with_site(name)
            stack.enter_context(running(broker, partial(ClientService, site),
                                        service_bus(broker, site, f"client-{name}", service_topology_too=False)))
        stack.enter_context(running(broker, lambda b: ServerService(settings, b),
                                    service_bus(broker, settings, "server")))
        probe.wait(lambda: len([d for d in probe.got if d.msg_type == "client.heartbeat"]) >= 4, "both sites")

        req = AdminRequest("submit", files=read_job_folder(example_job("hello-numpy-cross-val")))
        reply = probe.bus.rpc(probe.names.admin, RK_ADMIN_SERVER, req, 5.0).message(AdminReply, LIMIT)
        assert reply.ok, reply.error
        job = str(reply.result["job_id"])
        ended = probe.first(JobEvent, lambda e: e.job_id == job and e.status not in ("submitted", "running"),
                            timeout=20.0)
        assert ended.status == FINISHED, ended.reason
        assert [h["round"] for h in ended.history] == [0, 1, 2]

        # the tasks: a submit_model and one validate task per model (SRV_server, site-1, site-2), each
        # once to every site, results to the server
        cse_tasks = probe.all(TrainTask, lambda t: t.task_name != "train")
        assert sorted(t.task_name for t in cse_tasks) == ["submit_model", "validate", "validate", "validate"]
        assert all(t.result_to == "server" and t.targets == list(SITES) for t in cse_tasks)
        owners = sorted(t.dxo.meta["model_owner"] for t in cse_tasks if t.task_name == "validate")
        assert owners == ["SRV_server", "site-1", "site-2"]
        # their results went to the server (result.server), none to the aggregator's queue (result)
        by_rk = {(d.routing_key, d.message(TaskResult, LIMIT).task_name) for d in probe.got
                 if d.msg_type == TaskResult.TYPE}
        assert by_rk == {(RK_RESULT, "train"), (RK_RESULT_SERVER, "submit_model"), (RK_RESULT_SERVER, "validate")}
        metrics = probe.all(TaskResult, lambda r: r.task_name == "validate")
        assert len(metrics) == 6 and all(r.dxo is not None and r.dxo.kind == METRICS for r in metrics)
        submitted = probe.all(TaskResult, lambda r: r.task_name == "submit_model")
        assert all(r.dxo is not None and r.dxo.kind == WEIGHTS for r in submitted)
        saves = probe.all(CrossValSave, lambda m: m.job_id == job)
        assert sorted(m.model_owner for m in saves) == ["", "site-1", "site-2"]

        down = probe.bus.rpc(probe.names.admin, RK_ADMIN_PERSISTOR, AdminRequest("download", {"job_id": job}), 5.0)
        files = down.message(AdminReply, LIMIT).files
        results = json.loads(files["cross_site_val/cross_val_results.json"])
        assert sorted(results) == list(SITES)
        for site in SITES:
            assert sorted(results[site]) == ["SRV_server", "site-1", "site-2"]
            for owner in results[site]:
                # NVFlare's NPValidator on these models: 72 / 12 = 6 plus a random epsilon in [0, 1)
                assert 6.0 <= results[site][owner]["accuracy"] < 7.0
        for site in SITES:
            np.testing.assert_array_equal(np.load(io.BytesIO(files[f"cross_site_val/model_shareables/{site}.npy"])),
                                          FINAL)
        # recorded with the job: its end event's meta (the persistor's meta.json) and its status
        record = ended.meta["cross_site_eval"]
        assert record["results"] == results and record["failures"] == [] and record["phase"] == "done"
        assert record["participants"] == list(SITES) and sorted(record["models"]) == ["SRV_server", "site-1", "site-2"]
        assert json.loads(files["meta.json"])["cross_site_eval"] == record
        st = probe.bus.rpc(probe.names.admin, RK_ADMIN_SERVER, AdminRequest("status", {"job_id": job}), 5.0)
        assert st.message(AdminReply, LIMIT).result["cross_site_eval"] == record
        np.testing.assert_array_equal(np.load(io.BytesIO(files["models/server.npy"])), FINAL)
    assert probe.bus.dead_lettered == 0 and not [d for d in probe.got if d.exchange == probe.names.dead]


def test_a_model_in_parts_is_submitted_one_site_at_a_time(broker: MemoryBroker, tmp_path: Path) -> None:
    """A model larger than SAGMQ_CHUNK_BYTES travels in parts, as tasks do; three sites submit theirs one after
    another (the server's prefetch holds the parts of two large messages), and every matrix cell comes."""
    settings = Settings(prefix="t", workspace=tmp_path / "ws", heartbeat_s=0.1, client_timeout_s=3.0,
                        schedule_timeout_s=10.0, chunk_timeout_s=5.0, rpc_timeout_s=5.0, chunk_bytes=4096)
    sites = ("site-1", "site-2", "site-3")
    start = np.arange(1, 64 * 64 + 1, dtype=np.float64).reshape(64, 64)  # 32 KiB: 9 parts of 4 KiB
    files = dict(read_job_folder(example_job("hello-numpy-cross-val")))

    def server(c: dict[str, Any]) -> None:
        next(x for x in c["components"] if x["id"] == "persistor")["args"] = {"model": start.tolist()}
        c["workflows"][0]["args"].update(min_clients=3, num_rounds=1)

    cfg = json.loads(files[SFILE])
    server(cfg)
    files[SFILE] = json.dumps(cfg).encode()
    meta = json.loads(files["meta.json"])
    files["meta.json"] = json.dumps({**meta, "min_clients": 3}).encode()
    probe = Probe(broker, settings, also=((f"{settings.prefix}.results", RK_RESULT_SERVER),
                                          *((f"{settings.prefix}.tasks", site) for site in sites)))
    with ExitStack() as stack:
        for name, build in (("persistor", lambda b: PersistorService(settings, b)),
                            ("aggregator", lambda b: AggregatorService(settings, b, grace_s=1.0))):
            stack.enter_context(running(broker, build, service_bus(broker, settings, name)))
        for name in sites:
            site = settings.with_site(name)
            stack.enter_context(running(broker, partial(ClientService, site),
                                        service_bus(broker, site, f"client-{name}", service_topology_too=False)))
        stack.enter_context(running(broker, lambda b: ServerService(settings, b),
                                    service_bus(broker, settings, "server")))
        probe.wait(lambda: len({d.message(ClientHeartbeat, LIMIT).site for d in probe.got
                                if d.msg_type == ClientHeartbeat.TYPE}) == 3, "three sites")
        reply = probe.bus.rpc(probe.names.admin, RK_ADMIN_SERVER, AdminRequest("submit", files=files),
                              5.0).message(AdminReply, LIMIT)
        assert reply.ok, reply.error
        job = str(reply.result["job_id"])
        ended = probe.first(JobEvent, lambda e: e.job_id == job and e.status not in ("submitted", "running"),
                            timeout=30.0)
        assert ended.status == FINISHED, ended.reason
        submits = probe.all(TrainTask, lambda t: t.task_name == "submit_model")
        assert sorted(t.targets[0] for t in submits) == list(sites) and all(len(t.targets) == 1 for t in submits)
        down = probe.bus.rpc(probe.names.admin, RK_ADMIN_PERSISTOR, AdminRequest("download", {"job_id": job}), 5.0)
        got = down.message(AdminReply, LIMIT).files
        results = json.loads(got["cross_site_val/cross_val_results.json"])
        assert {c: sorted(r) for c, r in results.items()} == {c: ["SRV_server", *sites] for c in sites}
        np.testing.assert_array_equal(np.load(io.BytesIO(got["cross_site_val/model_shareables/site-3.npy"])),
                                      start + 1)
    assert probe.bus.dead_lettered == 0 and not [d for d in probe.got if d.exchange == probe.names.dead]


def test_a_server_restarted_during_evaluation_runs_it_again_to_the_full_matrix(broker: MemoryBroker,
                                                                              settings: Settings) -> None:
    """The restarted server resumes the job, finds its last round saved, and evaluates again with new task ids;
    the sites' answers to the old tasks are ignored."""
    files = dict(read_job_folder(example_job("hello-numpy-cross-val")))
    cfg = json.loads(files[CFILE])
    cfg["executors"][1]["executor"]["args"] = {"sleep_time": 0.2}  # validations slow enough to stop the server
    files[CFILE] = json.dumps(cfg).encode()
    probe = Probe(broker, settings, also=tuple((f"{settings.prefix}.tasks", s) for s in SITES))
    with ExitStack() as stack:
        for name, build in (("persistor", lambda b: PersistorService(settings, b)),
                            ("aggregator", lambda b: AggregatorService(settings, b, grace_s=1.0))):
            stack.enter_context(running(broker, build, service_bus(broker, settings, name)))
        for name in SITES:
            site = settings.with_site(name)
            stack.enter_context(running(broker, partial(ClientService, site),
                                        service_bus(broker, site, f"client-{name}", service_topology_too=False)))
        with running(broker, lambda b: ServerService(settings, b), service_bus(broker, settings, "server")):
            probe.wait(lambda: len({d.message(ClientHeartbeat, LIMIT).site for d in probe.got
                                    if d.msg_type == ClientHeartbeat.TYPE}) == 2, "both sites")
            reply = probe.bus.rpc(probe.names.admin, RK_ADMIN_SERVER, AdminRequest("submit", files=files),
                                  5.0).message(AdminReply, LIMIT)
            assert reply.ok, reply.error
            job = str(reply.result["job_id"])
            probe.wait(lambda: probe.all(TrainTask, lambda t: t.task_name == "validate"), "a validate task", 20.0)
        probe.bus.process(0.3)  # everything the stopped server sent reaches the probe
        first = {t.task_id for t in probe.all(TrainTask, lambda t: t.task_name != "train")}
        stack.enter_context(running(broker, lambda b: ServerService(settings, b),
                                    service_bus(broker, settings, "server-2")))
        ended = probe.first(JobEvent, lambda e: e.job_id == job and e.status not in ("submitted", "running"),
                            timeout=30.0)
        assert ended.status == FINISHED, ended.reason
        again = [(t.task_name, t.dxo.meta.get("model_owner", "")) for t in probe.all(TrainTask)
                 if t.task_name != "train" and t.task_id not in first]
        assert sorted(again) == [("submit_model", ""), ("validate", "SRV_server"), ("validate", "site-1"),
                                 ("validate", "site-2")], (again, len(first), ended.meta)
        record = ended.meta["cross_site_eval"]
        assert {c: sorted(r) for c, r in record["results"].items()} == {
            s: ["SRV_server", *SITES] for s in SITES}
        assert record["failures"] == []
        assert [h["round"] for h in ended.history] == [0, 1, 2]  # training did not run again
