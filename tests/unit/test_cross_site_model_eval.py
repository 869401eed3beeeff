"""CrossSiteModelEval's rules with a fake clock: the tasks it sends, the matrix it gathers, its timeouts,
sites that never answer or stop heartbeating, participating_clients, and bad answers."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sagmq.job.cross_site_spec import CSEConfig
from sagmq.job.spec import JobSpec, parse_job, read_job_folder
from sagmq.server.cross_site_model_eval import CrossSiteModelEval, CSEEffect, CSEPhase, SaveCrossVal
from sagmq.server.scatter_and_gather import ControlSites, EndJob, SendTask
from sagmq.wire.codec import DXO, METRICS, WEIGHTS
from sagmq.wire.messages import ABORTED, FINISHED, RC_EXECUTION_EXCEPTION, RC_OK, RESULT_TO_SERVER, TaskResult

CROSS_VAL = Path(__file__).resolve().parents[2] / "jobs" / "hello-numpy-cross-val"
JOB = "0123456789abcdef0123456789abcdef"
GLOBAL = {"numpy_key": np.arange(1, 10, dtype=np.float32).reshape(3, 3) + 3}
SITES = ("site-1", "site-2")


def spec() -> JobSpec:
    return parse_job(read_job_folder(CROSS_VAL))


def cse(**changes: Any) -> CrossSiteModelEval:
    s = spec()
    assert s.cse is not None
    return CrossSiteModelEval(JOB, s, dataclasses.replace(s.cse, **changes), round=3)


def tasks(effects: list[CSEEffect]) -> list[SendTask]:
    return [e for e in effects if isinstance(e, SendTask)]


def saves(effects: list[CSEEffect]) -> list[SaveCrossVal]:
    return [e for e in effects if isinstance(e, SaveCrossVal)]


def submit_task(effects: list[CSEEffect]) -> SendTask:
    (t,) = [t for t in tasks(effects) if t.task.task_name == "submit_model"]
    return t


def validate_tasks(effects: list[CSEEffect]) -> dict[str, SendTask]:
    return {t.task.dxo.meta["model_owner"]: t for t in tasks(effects) if t.task.task_name == "validate"}


def model(site: str) -> DXO:
    return DXO(WEIGHTS, {"numpy_key": GLOBAL["numpy_key"] + (1 if site == "site-1" else 2)})


def submitted(t: SendTask, site: str, rc: str = RC_OK, dxo: DXO | None = None) -> TaskResult:
    return TaskResult(JOB, 3, t.task.task_name, t.task.task_id, site, rc, dxo if dxo is not None else model(site))


def metrics(t: SendTask, site: str, acc: float, rc: str = RC_OK) -> TaskResult:
    dxo = DXO(METRICS, {"accuracy": np.array(acc)}) if rc == RC_OK else None
    return TaskResult(JOB, 3, "validate", t.task.task_id, site, rc, dxo, "" if rc == RC_OK else "boom")


def test_the_full_matrix_every_site_validates_every_model() -> None:
    c = cse()
    out = c.start(0.0, SITES, GLOBAL)
    sub = submit_task(out)
    assert sub.sites == SITES and sub.task.result_to == RESULT_TO_SERVER and sub.task.round == 3
    assert sub.task.dxo.data == {} and sub.expiration_s == 600
    val = validate_tasks(out)
    assert list(val) == ["SRV_server"]  # the locator's final global model, before any site's model
    assert val["SRV_server"].sites == SITES and val["SRV_server"].expiration_s == 6000
    np.testing.assert_array_equal(val["SRV_server"].task.dxo.data["numpy_key"], GLOBAL["numpy_key"])
    assert c.phase == CSEPhase.RUNNING
    for site in SITES:
        out = c.on_result(submitted(sub, site), 1.0)
        (v,) = validate_tasks(out).values()
        assert v.task.dxo.meta["model_owner"] == site and v.sites == SITES
        np.testing.assert_array_equal(v.task.dxo.data["numpy_key"], model(site).data["numpy_key"])
        (save,) = saves(out)  # the submitted model goes to the persistor, behind its validate task
        assert out.index(v) < out.index(save)
        assert save.message.model_owner == site and save.message.cross_val_dir == "cross_site_val"
        val[site] = v
    end: list[CSEEffect] = []
    for i, (owner, t) in enumerate(sorted(val.items())):
        for j, site in enumerate(SITES):
            end = c.on_result(metrics(t, site, 6.0 + i + j / 10), 2.0)
            if (owner, site) != ("site-2", "site-2"):
                assert end == []
    save, done = end
    assert isinstance(save, SaveCrossVal) and done == EndJob(FINISHED, "", ordered=True)
    assert save.message.results_path == "cross_site_val/cross_val_results.json"
    assert save.message.results == {
        "site-1": {"SRV_server": {"accuracy": 6.0}, "site-1": {"accuracy": 7.0}, "site-2": {"accuracy": 8.0}},
        "site-2": {"SRV_server": {"accuracy": 6.1}, "site-1": {"accuracy": 7.1}, "site-2": {"accuracy": 8.1}},
    }
    assert c.phase == CSEPhase.DONE and c.failures == []


def test_cleanup_models_keeps_no_submitted_model() -> None:
    c = cse(cleanup_models=True)
    sub = submit_task(c.start(0.0, SITES, GLOBAL))
    out = c.on_result(submitted(sub, "site-1"), 1.0)
    assert saves(out) == [] and list(validate_tasks(out)) == ["site-1"]


def test_a_site_that_never_submits_is_given_up_at_submit_model_timeout() -> None:
    c = cse(submit_model_timeout=30)
    out = c.start(0.0, SITES, GLOBAL)
    sub, srv = submit_task(out), validate_tasks(out)["SRV_server"]
    own = validate_tasks(c.on_result(submitted(sub, "site-1"), 1.0))["site-1"]
    for t in (srv, own):
        for site in SITES:
            assert c.on_result(metrics(t, site, 5.0), 2.0) == []
    assert c.on_tick(29.9, SITES) == []  # site-2 is alive and still has time
    save, done = c.on_tick(30.0, SITES)
    assert isinstance(save, SaveCrossVal) and isinstance(done, EndJob) and done.status == FINISHED
    assert set(save.message.results["site-1"]) == {"SRV_server", "site-1"}  # no site-2 model to validate
    assert c.failures == [{"site": "site-2", "model_owner": "",
                           "reason": "gave no answer to its submit_model task: no answer within 30 s"}]


def test_a_validation_that_never_comes_is_given_up_at_validation_timeout() -> None:
    c = cse(submit_model_task_name="", validation_timeout=100)
    out = c.start(0.0, SITES, GLOBAL)
    assert [t.task.task_name for t in tasks(out)] == ["validate"]  # no submit_model task: server models only
    srv = validate_tasks(out)["SRV_server"]
    assert c.on_result(metrics(srv, "site-1", 6.5), 1.0) == []
    assert c.on_tick(99.0, SITES) == []
    save, _ = c.on_tick(100.0, SITES)
    assert isinstance(save, SaveCrossVal) and save.message.results == {"site-1": {"SRV_server": {"accuracy": 6.5}}}
    assert c.failures[0]["site"] == "site-2" and c.failures[0]["model_owner"] == "SRV_server"


def test_zero_timeouts_mean_no_limit_while_the_site_is_alive() -> None:
    c = cse(submit_model_timeout=0, validation_timeout=0)
    out = c.start(0.0, SITES, GLOBAL)
    assert submit_task(out).expiration_s is None
    assert c.on_tick(1e6, SITES) == [] and c.phase == CSEPhase.RUNNING


def test_a_site_that_stops_heartbeating_is_given_up_at_once() -> None:
    c = cse()
    out = c.start(0.0, SITES, GLOBAL)
    sub, srv = submit_task(out), validate_tasks(out)["SRV_server"]
    own = validate_tasks(c.on_result(submitted(sub, "site-1"), 1.0))["site-1"]
    c.on_result(metrics(srv, "site-1", 6.0), 1.0)
    assert c.on_result(metrics(own, "site-1", 7.0), 1.0) == []
    save, done = c.on_tick(2.0, ["site-1"])  # site-2 went silent: its submit and both validations are given up
    assert isinstance(done, EndJob) and done.status == FINISHED
    assert isinstance(save, SaveCrossVal) and save.message.results == {
        "site-1": {"SRV_server": {"accuracy": 6.0}, "site-1": {"accuracy": 7.0}}}
    assert sorted((f["site"], f["model_owner"]) for f in c.failures) == [
        ("site-2", ""), ("site-2", "SRV_server"), ("site-2", "site-1")]


def test_participating_clients_limit_the_tasks_to_them() -> None:
    c = cse(participating_clients=("site-2",))
    out = c.start(0.0, [*SITES, "site-3"], GLOBAL)
    assert {t.sites for t in tasks(out)} == {("site-2",)}
    sub, srv = submit_task(out), validate_tasks(out)["SRV_server"]
    assert c.on_result(submitted(sub, "site-1"), 1.0) == []  # not a participant: ignored
    own = validate_tasks(c.on_result(submitted(sub, "site-2"), 1.0))["site-2"]
    c.on_result(metrics(srv, "site-2", 6.0), 2.0)
    save, _ = c.on_result(metrics(own, "site-2", 6.5), 2.0)
    assert isinstance(save, SaveCrossVal)
    assert save.message.results == {"site-2": {"SRV_server": {"accuracy": 6.0}, "site-2": {"accuracy": 6.5}}}


def test_a_named_participant_gets_wait_for_clients_timeout_to_appear_then_is_left_out() -> None:
    c = cse(participating_clients=SITES, wait_for_clients_timeout=20.0)
    assert c.start(0.0, ["site-1"], GLOBAL) == [] and c.phase == CSEPhase.WAITING
    assert "site-2" in c.waiting_for(5.0)
    assert c.on_tick(19.0, ["site-1"]) == []
    out = c.on_tick(20.0, ["site-1"])
    assert {t.sites for t in tasks(out)} == {("site-1",)} and c.missing == ["site-2"]
    assert c.status(20.0)["missing"] == ["site-2"]


def test_participants_that_appear_in_time_all_take_part() -> None:
    c = cse(participating_clients=SITES, wait_for_clients_timeout=20.0)
    assert c.start(0.0, [], GLOBAL) == []
    out = c.on_tick(3.0, SITES)
    assert {t.sites for t in tasks(out)} == {SITES} and c.missing == []


def test_no_site_at_all_ends_without_results_after_wait_for_clients_timeout() -> None:
    c = cse(wait_for_clients_timeout=10.0)
    assert c.start(0.0, [], GLOBAL) == []
    assert c.on_tick(9.9, []) == []
    save, done = c.on_tick(10.0, [])
    assert isinstance(save, SaveCrossVal) and save.message.results == {}
    assert done == EndJob(FINISHED, "", ordered=True)


def test_bad_answers_are_failures_and_stay_out_of_the_matrix() -> None:
    c = cse()
    out = c.start(0.0, SITES, GLOBAL)
    sub, srv = submit_task(out), validate_tasks(out)["SRV_server"]
    assert c.on_result(submitted(sub, "site-1", RC_EXECUTION_EXCEPTION), 1.0) == []  # no model: not validated
    assert c.on_result(submitted(sub, "site-2", dxo=DXO(METRICS, {"a": np.array(1.0)})), 1.0) == []
    assert c.on_result(metrics(srv, "site-1", 0.0, RC_EXECUTION_EXCEPTION), 1.0) == []
    wrong_kind = TaskResult(JOB, 3, "validate", srv.task.task_id, "site-2", RC_OK, model("site-2"))
    save, done = c.on_result(wrong_kind, 1.0)
    assert isinstance(save, SaveCrossVal) and save.message.results == {}
    assert isinstance(done, EndJob) and done.status == FINISHED
    reasons = [f["reason"] for f in c.failures]
    assert len(reasons) == 4
    assert "rc EXECUTION_EXCEPTION" in reasons[0] and "a METRICS DXO, not WEIGHTS" in reasons[1]
    assert "not METRICS" in reasons[3]


def test_duplicates_unknown_tasks_and_late_answers_are_ignored() -> None:
    c = cse()
    out = c.start(0.0, SITES, GLOBAL)
    srv = validate_tasks(out)["SRV_server"]
    assert c.on_result(metrics(srv, "site-1", 6.0), 1.0) == []
    assert c.on_result(metrics(srv, "site-1", 9.0), 1.0) == []  # a second answer does not replace the first
    assert c.results()["site-1"]["SRV_server"] == {"accuracy": 6.0}
    stranger = TaskResult(JOB, 3, "validate", "f" * 32, "site-1", RC_OK, DXO(METRICS, {"accuracy": np.array(1.0)}))
    assert c.on_result(stranger, 1.0) == []
    renamed = dataclasses.replace(metrics(srv, "site-2", 6.0), task_name="train")  # not this task's name
    assert c.on_result(renamed, 1.0) == [] and "site-2" in c.tasks[srv.task.task_id].outstanding


def test_abort_stops_the_participants_work() -> None:
    c = cse()
    c.start(0.0, SITES, GLOBAL)
    stop, end = c.abort("aborted by the admin", 1.0)
    assert isinstance(stop, ControlSites) and stop.sites == SITES and stop.message.command == "abort"
    assert end == EndJob(ABORTED, "aborted by the admin")
    assert c.abort("again", 2.0) == []


def test_without_a_locator_only_site_models_are_validated() -> None:
    c = cse(locator=None)
    out = c.start(0.0, SITES, GLOBAL)
    assert validate_tasks(out) == {} and submit_task(out)


@pytest.mark.parametrize("field", ["submit_model_timeout", "validation_timeout"])
def test_status_names_what_is_outstanding(field: str) -> None:
    c = cse(**{field: 50})
    c.start(0.0, SITES, GLOBAL)
    st = c.status(4.0)
    assert st["phase"] == "cross_site_eval" and st["participants"] == list(SITES)
    assert st["waiting_for"] == {"submit_model": list(SITES), "SRV_server": list(SITES)}
    assert "site-1, site-2" in c.waiting_for(4.0)


def test_config_defaults_are_nvflares() -> None:
    d = CSEConfig()
    assert (d.task_check_period, d.cross_val_dir, d.submit_model_timeout, d.validation_timeout, d.model_locator_id,
            d.formatter_id, d.submit_model_task_name, d.validation_task_name, d.cleanup_models,
            d.participating_clients, d.wait_for_clients_timeout) == (
        0.5, "cross_site_val", 600, 6000, "", "", "submit_model", "validate", False, (), 300.0)


def test_models_in_parts_are_asked_of_one_site_at_a_time() -> None:
    s = spec()
    assert s.cse is not None
    c = CrossSiteModelEval(JOB, s, dataclasses.replace(s.cse, submit_model_timeout=10), round=3,
                           submit_one_at_a_time=True)
    sites = (*SITES, "site-3")
    out = c.start(0.0, sites, GLOBAL)
    first = submit_task(out)
    assert first.sites == ("site-1",) and validate_tasks(out)["SRV_server"].sites == sites
    out = c.on_result(submitted(first, "site-1"), 1.0)
    second = submit_task(out)  # site-1's answer is in: site-2's turn
    assert second.sites == ("site-2",) and list(validate_tasks(out)) == ["site-1"]
    assert c.on_tick(10.5, sites) == []  # site-2's own 10 s count from its task
    third = submit_task(c.on_tick(11.0, sites))  # site-2 gave no answer in time: site-3's turn
    assert third.sites == ("site-3",)
    assert [f["site"] for f in c.failures] == ["site-2"]
    assert "submit_model" in c.status(11.0)["waiting_for"]
