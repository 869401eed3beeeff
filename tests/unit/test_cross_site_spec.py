"""CrossSiteModelEval in a job folder: jobs/hello-numpy-cross-val as NVFlare writes it, NVFlare's argument
checks, the components it names (NPModelLocator, NPFormatter, ValidationJsonGenerator) and NPValidator."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sagmq.job.cross_site_spec import VALIDATOR, CSEConfig, LocatorConfig
from sagmq.job.spec import TRAINER, Files, parse_client_config, parse_job, parse_server_filters, read_job_folder
from sagmq.wire.errors import JobSpecError

ROOT = Path(__file__).resolve().parents[2]
CROSS_VAL = ROOT / "jobs" / "hello-numpy-cross-val"
SFILE = "app/config/config_fed_server.json"
CFILE = "app/config/config_fed_client.json"


def files() -> Files:
    return read_job_folder(CROSS_VAL)


def edit(name: str, fn: Callable[[dict[str, Any]], None]) -> Files:
    out = files()
    obj = json.loads(out[name])
    fn(obj)
    out[name] = json.dumps(obj).encode()
    return out


def cse_args(**changes: Any) -> Files:
    return edit(SFILE, lambda c: c["workflows"][1]["args"].update(changes))


def comp_args(cid: str, **args: Any) -> Files:
    return edit(SFILE, lambda c: next(x for x in c["components"] if x["id"] == cid).update(args=args))


def test_the_shipped_job_runs_sag_then_cross_site_eval() -> None:
    spec = parse_job(files())
    assert spec.sag.num_rounds == 3 and spec.sag.min_clients == 2
    assert spec.cse == CSEConfig(model_locator_id="model_locator", formatter_id="formatter",
                                 locator=LocatorConfig(), formatter=True)
    assert spec.cse.json_path == "cross_site_val/cross_val_results.json"
    trainer, validator = parse_client_config(spec.client_apps()["app"])
    assert trainer.path == TRAINER and trainer.tasks == ("train", "submit_model")
    assert validator.path == VALIDATOR and validator.tasks == ("validate",) and not validator.custom


def test_a_job_without_the_second_workflow_has_no_cross_site_eval() -> None:
    assert parse_job(edit(SFILE, lambda c: c["workflows"].pop())).cse is None


def test_arguments_are_honoured() -> None:
    spec = parse_job(cse_args(participating_clients=["site-2"], submit_model_timeout=5, validation_timeout=7,
                              wait_for_clients_timeout=2.5, cross_val_dir="cv", cleanup_models=True,
                              submit_model_task_name="", validation_task_name="check", task_check_period=1.0))
    c = spec.cse
    assert c is not None
    assert (c.participating_clients, c.submit_model_timeout, c.validation_timeout, c.wait_for_clients_timeout,
            c.cross_val_dir, c.cleanup_models, c.submit_model_task_name, c.validation_task_name) == (
        ("site-2",), 5, 7, 2.5, "cv", True, "", "check")


def test_the_json_generator_says_where_the_results_go() -> None:
    spec = parse_job(comp_args("json_generator", results_dir="out/cv", json_file_name="r.json"))
    assert spec.cse is not None and spec.cse.json_path == "out/cv/r.json"


# values NVFlare's constructor refuses (TypeError / ValueError there), and sagmq's own refusals
REFUSED = [
    ("task_check_period integer", cse_args(task_check_period=1), "workflows[1].args.task_check_period"),
    ("submit_model_timeout negative", cse_args(submit_model_timeout=-1), "workflows[1].args.submit_model_timeout"),
    ("submit_model_timeout float", cse_args(submit_model_timeout=1.5), "workflows[1].args.submit_model_timeout"),
    ("validation_timeout string", cse_args(validation_timeout="x"), "workflows[1].args.validation_timeout"),
    ("wait_for_clients_timeout negative", cse_args(wait_for_clients_timeout=-3),
     "workflows[1].args.wait_for_clients_timeout"),
    ("cleanup_models string", cse_args(cleanup_models="no"), "workflows[1].args.cleanup_models"),
    ("cross_val_dir absolute", cse_args(cross_val_dir="/etc"), "workflows[1].args.cross_val_dir"),
    ("cross_val_dir escapes", cse_args(cross_val_dir="../x"), "workflows[1].args.cross_val_dir"),
    ("participating_clients a string", cse_args(participating_clients="site-1"),
     "workflows[1].args.participating_clients"),
    ("same task names", cse_args(validation_task_name="submit_model"), "workflows[1].args.validation_task_name"),
    ("unknown argument", cse_args(no_such=1), "workflows[1].args.no_such"),
    ("locator id unknown", cse_args(model_locator_id="nope"), "workflows[1].args.model_locator_id"),
    ("locator id of another kind", cse_args(model_locator_id="aggregator"), "workflows[1].args.model_locator_id"),
    ("formatter id of another kind", cse_args(formatter_id="model_locator"), "workflows[1].args.formatter_id"),
    ("formatter with args", comp_args("formatter", x=1), "components[4].args"),
    ("locator elsewhere", comp_args("model_locator", model_name="other.npy"), "components[3].args.model_name"),
    ("locator of two models", comp_args("model_locator", model_name={"a": "server.npy", "b": "b.npy"}),
     "components[3].args.model_name"),
    ("locator unknown arg", comp_args("model_locator", x=1), "components[3].args.x"),
    ("json generator unknown arg", comp_args("json_generator", x=1), "components[5].args.x"),
    ("json file in a folder", comp_args("json_generator", json_file_name="a/b.json"),
     "components[5].args.json_file_name"),
    ("validator unknown arg", edit(CFILE, lambda c: c["executors"][1]["executor"].update(args={"x": 1})),
     "executors[1].executor.args.x"),
    ("validator sleep_time negative",
     edit(CFILE, lambda c: c["executors"][1]["executor"].update(args={"sleep_time": -1})),
     "executors[1].executor.args.sleep_time"),
]


@pytest.mark.parametrize(("files_", "field"), [(f, fld) for _, f, fld in REFUSED], ids=[r[0] for r in REFUSED])
def test_refusals_name_file_and_field(files_: Files, field: str) -> None:
    with pytest.raises(JobSpecError) as e:
        parse_job(files_)
    assert field in str(e.value)
    assert "config_fed_" in str(e.value)


def test_a_locator_matching_a_custom_persistor_name_is_accepted() -> None:
    def change(c: dict[str, Any]) -> None:
        next(x for x in c["components"] if x["id"] == "persistor")["args"] = {"model_name": "final.npy"}
        next(x for x in c["components"] if x["id"] == "model_locator")["args"] = {"model_name": {"g": "final.npy"}}

    spec = parse_job(edit(SFILE, change))
    assert spec.cse is not None and spec.cse.locator == LocatorConfig("models", (("g", "final.npy"),))


def test_the_json_generator_is_used_by_cross_site_eval_and_task_check_period_is_said_to_do_nothing() -> None:
    _, warnings = parse_server_filters(files(), "app")
    assert warnings == []
    _, warnings = parse_server_filters(edit(SFILE, lambda c: c["workflows"].pop()), "app")
    assert [w for w in warnings if "json_generator" in w and "no effect" in w]
    _, warnings = parse_server_filters(cse_args(task_check_period=1.0), "app")
    assert warnings == [f"{SFILE}: workflows[1].args.task_check_period has no effect in sagmq (the server looks at "
                        "its tasks on every tick, 20 times a second)"]
