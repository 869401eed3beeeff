"""NVFlare job folders: the real hello-numpy-sag jobs, aliases, multi-app jobs, and every refusal."""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sagmq.job.cross_site_spec import CSE, FORMATTER, JSON_GENERATOR, LOCATOR, VALIDATOR
from sagmq.job.spec import (
    AGGREGATOR,
    ALIASES,
    GENERATOR,
    PERSISTOR,
    SAG,
    TRAINER,
    Files,
    PersistorConfig,
    SAGConfig,
    app_for_site,
    component_name,
    parse_client_config,
    parse_job,
    read_job_folder,
)
from sagmq.wire.codec import WEIGHTS
from sagmq.wire.errors import JobSpecError

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "jobs" / "hello-numpy-sag"
CUSTOM = ROOT / "jobs" / "hello-numpy-sag-custom"
CROSS_VAL = ROOT / "jobs" / "hello-numpy-cross-val"
SFILE = "app/config/config_fed_server.json"
CFILE = "app/config/config_fed_client.json"


def hello_files() -> Files:
    return read_job_folder(HELLO)


def edit(files: Files, name: str, fn: Callable[[dict[str, Any]], None]) -> Files:
    out = dict(files)
    obj = json.loads(out[name])
    fn(obj)
    out[name] = json.dumps(obj).encode()
    return out


def sag_args(cfg: dict[str, Any]) -> dict[str, Any]:
    args: dict[str, Any] = cfg["workflows"][0]["args"]
    return args


def comp(cfg: dict[str, Any], cid: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in cfg["components"] if c["id"] == cid)
    return found


# --- the real jobs ---------------------------------------------------------------------------


def test_hello_numpy_sag_parses() -> None:
    spec = parse_job(hello_files())
    assert spec.name == "hello-numpy-sag"
    assert spec.min_clients == 2
    assert spec.deploy_map == {"app": ["@ALL"]}
    assert spec.server_app == "app"
    assert spec.sag.min_clients == 2
    assert spec.sag.num_rounds == 3
    assert spec.sag.start_round == 0
    assert spec.sag.train_timeout == 6000.0
    assert spec.sag.wait_time_after_min_received == 10.0
    assert spec.sag.ignore_result_error is None
    assert spec.sag.persist_every_n_rounds == 1
    assert spec.sag.train_task_name == "train"
    assert spec.sag.persistor_id == "persistor"
    assert spec.aggregator.expected_data_kind == WEIGHTS
    assert spec.aggregator.aggregation_weights == {"site-1": 1.0, "site-2": 1.0}
    assert spec.aggregator.exclude_vars == ""
    assert spec.aggregator.weigh_by_local_iter is True
    assert spec.persistor == PersistorConfig(model_dir="models", model_name="server.npy", model=None)
    assert spec.site_allowed("site-1") and spec.site_allowed("anything")


def test_hello_numpy_sag_client_app() -> None:
    spec = parse_job(hello_files())
    apps = spec.client_apps()
    assert set(apps) == {"app"}
    assert set(apps["app"]) == {"config/config_fed_client.json", "config/config_fed_server.json"}
    (ex,) = parse_client_config(apps["app"])
    assert ex.tasks == ("train",)
    assert ex.path == TRAINER
    assert ex.custom is False
    assert ex.args == {}


def test_hello_numpy_sag_custom_executor_is_marked_custom() -> None:
    files = read_job_folder(CUSTOM)
    assert "app/custom/custom_trainer.py" in files
    spec = parse_job(files)
    assert spec.name == "hello-numpy-sag-custom"
    (ex,) = parse_client_config(spec.client_apps()["app"])
    assert ex.custom is True
    assert ex.path == "custom_trainer.NPTrainer"
    assert ex.tasks == ("train",)
    assert ex.args["delta"] == 1.0


def test_custom_executor_in_a_package_is_found() -> None:
    files = edit(hello_files(), CFILE, lambda c: c["executors"][0]["executor"].update(path="mypkg.trainers.T"))
    with pytest.raises(JobSpecError):
        parse_job(files)
    files["app/custom/mypkg/trainers/__init__.py"] = b""
    (ex,) = parse_client_config(parse_job(files).client_apps()["app"])
    assert ex.custom is True and ex.path == "mypkg.trainers.T"


def test_sag_defaults_match_nvflare() -> None:
    files = edit(hello_files(), SFILE, lambda c: c["workflows"][0].update(args={"persistor_id": "persistor"}))
    spec = parse_job(files)
    assert spec.sag == SAGConfig(persistor_id="persistor")
    assert spec.sag.min_clients == 1000 and spec.sag.num_rounds == 5 and spec.sag.train_timeout == 0.0


def test_job_without_persistor_id_has_no_persistor() -> None:
    files = edit(hello_files(), SFILE, lambda c: sag_args(c).pop("persistor_id"))
    assert parse_job(files).persistor is None


def test_nvflare_ignored_sag_arguments_are_accepted_with_a_warning() -> None:
    files = edit(hello_files(), SFILE, lambda c: sag_args(c).update(task_check_period=0.5,
                                                                      snapshot_every_n_rounds=2))
    spec = parse_job(files)
    assert spec.sag.num_rounds == 3 and spec.sag.snapshot_every_n_rounds == 2  # honoured
    assert spec.warnings == (f"{SFILE}: workflows[0].args.task_check_period has no effect in sagmq "
                             "(sagmq reacts to messages; there is no task polling period)",)


# --- component paths -------------------------------------------------------------------------


# cross-site evaluation's components, in jobs/hello-numpy-cross-val (test_cross_site_spec.py tests them further)
CSE_IDS = {LOCATOR: "model_locator", FORMATTER: "formatter", JSON_GENERATOR: "json_generator"}


def with_path(files: Files, canon: str, path: str) -> Files:
    if canon == CSE:
        return edit(files, SFILE, lambda c: c["workflows"][1].update(path=path))
    if canon == VALIDATOR:
        return edit(files, CFILE, lambda c: c["executors"][1]["executor"].update(path=path))
    if canon in CSE_IDS:
        return edit(files, SFILE, lambda c: comp(c, CSE_IDS[canon]).update(path=path))
    if canon == SAG:
        return edit(files, SFILE, lambda c: c["workflows"][0].update(path=path))
    if canon == TRAINER:
        return edit(files, CFILE, lambda c: c["executors"][0]["executor"].update(path=path))
    cid = {AGGREGATOR: "aggregator", GENERATOR: "shareable_generator", PERSISTOR: "persistor"}[canon]
    return edit(files, SFILE, lambda c: comp(c, cid).update(path=path))


SAGMQ_PATHS = {
    SAG: "sagmq.server.scatter_and_gather.ScatterAndGather",
    AGGREGATOR: "sagmq.aggregator.intime_accumulate_weighted_aggregator.InTimeAccumulateWeightedAggregator",
    GENERATOR: "sagmq.server.full_model_shareable_generator.FullModelShareableGenerator",
    PERSISTOR: "sagmq.persistor.np_model_persistor.NPModelPersistor",
    TRAINER: "sagmq.client.np_trainer.NPTrainer",
    CSE: "sagmq.server.cross_site_model_eval.CrossSiteModelEval",
    LOCATOR: "sagmq.server.np_model_locator.NPModelLocator",
    FORMATTER: "sagmq.server.np_formatter.NPFormatter",
    JSON_GENERATOR: "sagmq.server.np_formatter.ValidationJsonGenerator",
    VALIDATOR: "sagmq.client.np_validator.NPValidator",
}

NVFLARE_PATHS = {
    "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather": SAG,
    "nvflare.app_common.workflows.ScatterAndGather": SAG,
    "nvflare.app_common.aggregators.intime_accumulate_model_aggregator.InTimeAccumulateWeightedAggregator": AGGREGATOR,
    "nvflare.app_common.aggregators.InTimeAccumulateWeightedAggregator": AGGREGATOR,
    "nvflare.app_common.shareablegenerators.full_model_shareable_generator.FullModelShareableGenerator": GENERATOR,
    "nvflare.app_common.shareablegenerators.FullModelShareableGenerator": GENERATOR,
    "nvflare.app_common.np.np_model_persistor.NPModelPersistor": PERSISTOR,
    "nvflare.app_common.np.np_trainer.NPTrainer": TRAINER,
    "nvflare.app_common.workflows.cross_site_model_eval.CrossSiteModelEval": CSE,
    "nvflare.app_common.workflows.CrossSiteModelEval": CSE,
    "nvflare.app_common.np.np_model_locator.NPModelLocator": LOCATOR,
    "nvflare.app_common.np.np_formatter.NPFormatter": FORMATTER,
    "nvflare.app_common.widgets.validation_json_generator.ValidationJsonGenerator": JSON_GENERATOR,
    "nvflare.app_common.np.np_validator.NPValidator": VALIDATOR,
}


@pytest.mark.parametrize(("path", "target"), sorted(ALIASES.items()))
def test_every_alias_resolves(path: str, target: str) -> None:
    canon = target.rsplit(".", 1)[1]
    assert component_name(path) == canon
    base = read_job_folder(CROSS_VAL) if canon in (CSE, VALIDATOR, *CSE_IDS) else hello_files()
    spec = parse_job(with_path(base, canon, path))
    assert spec.sag.num_rounds == 3
    if canon == TRAINER:
        (ex,) = parse_client_config(spec.client_apps()["app"])
        assert ex.path == TRAINER and not ex.custom


def test_aliases_cover_nvflare_sagmq_and_bare_names() -> None:
    for canon, sagmq_path in SAGMQ_PATHS.items():
        assert ALIASES[sagmq_path] == sagmq_path
        assert ALIASES[canon] == sagmq_path
    for nvflare_path, canon in NVFLARE_PATHS.items():
        assert ALIASES[nvflare_path] == SAGMQ_PATHS[canon]
    assert len(ALIASES) == len(NVFLARE_PATHS) + 2 * len(SAGMQ_PATHS)  # nothing else, no old services.* path


@pytest.mark.parametrize("target", sorted(set(ALIASES.values())))
def test_every_alias_names_a_class_that_exists(target: str) -> None:
    module_name, cls_name = target.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    assert inspect.isclass(cls) and cls.__name__ == cls_name


def test_sagmq_own_paths_all_at_once() -> None:
    files = read_job_folder(CROSS_VAL)
    for canon, path in SAGMQ_PATHS.items():
        files = with_path(files, canon, path)
    spec = parse_job(files)
    assert spec.aggregator.expected_data_kind == WEIGHTS


def test_bare_class_names_all_at_once() -> None:
    files = hello_files()
    for canon in (SAG, AGGREGATOR, GENERATOR, PERSISTOR, TRAINER):
        files = with_path(files, canon, canon)
    assert parse_job(files).sag.min_clients == 2


def test_component_name_key_is_accepted_like_path() -> None:
    def to_name(c: dict[str, Any]) -> None:
        a = comp(c, "aggregator")
        a["name"] = a.pop("path")
    assert parse_job(edit(hello_files(), SFILE, to_name)).aggregator.expected_data_kind == WEIGHTS


# --- multi-app jobs --------------------------------------------------------------------------


def client_cfg(delta: float) -> bytes:
    return json.dumps({"format_version": 2, "executors": [
        {"tasks": ["train"], "executor": {"path": "nvflare.app_common.np.np_trainer.NPTrainer",
                                          "args": {"delta": delta}}}]}).encode()


def multi_app_files(deploy_map: dict[str, list[str]] | None = None) -> Files:
    hello = hello_files()
    dm = deploy_map or {"app_server": ["server"], "app_site1": ["site-1"], "app_site2": ["site-2"]}
    return {
        "meta.json": json.dumps({"name": "multi", "min_clients": 2, "deploy_map": dm}).encode(),
        "app_server/config/config_fed_server.json": hello[SFILE],
        "app_site1/config/config_fed_client.json": client_cfg(1.0),
        "app_site2/config/config_fed_client.json": client_cfg(2.5),
    }


def test_multi_app_job_parses_and_each_site_gets_its_app() -> None:
    spec = parse_job(multi_app_files())
    assert spec.server_app == "app_server"
    assert app_for_site(spec.deploy_map, "site-1") == "app_site1"
    assert app_for_site(spec.deploy_map, "site-2") == "app_site2"
    assert app_for_site(spec.deploy_map, "site-3") is None
    assert spec.site_allowed("site-2") and not spec.site_allowed("site-3")
    apps = spec.client_apps()
    assert set(apps) == {"app_site1", "app_site2"}
    assert set(apps["app_site2"]) == {"config/config_fed_client.json"}
    assert parse_client_config(apps["app_site1"])[0].args == {"delta": 1.0}
    assert parse_client_config(apps["app_site2"])[0].args == {"delta": 2.5}


def test_multi_app_all_fallback() -> None:
    files = multi_app_files({"app_server": ["@ALL"], "app_site2": ["site-2"]})
    files["app_server/config/config_fed_client.json"] = client_cfg(0.5)
    del files["app_site1/config/config_fed_client.json"]
    spec = parse_job(files)
    assert spec.server_app == "app_server"
    assert app_for_site(spec.deploy_map, "site-2") == "app_site2"
    assert app_for_site(spec.deploy_map, "site-1") == "app_server"
    assert app_for_site(spec.deploy_map, "site-99") == "app_server"
    assert set(spec.client_apps()) == {"app_server", "app_site2"}


def test_app_for_site_prefers_explicit_over_all_whatever_the_order() -> None:
    dm = {"everyone": ["@ALL"], "special": ["site-1"]}
    assert app_for_site(dm, "site-1") == "special"
    assert app_for_site(dm, "site-2") == "everyone"


def test_multi_app_client_app_is_validated() -> None:
    files = multi_app_files()
    files["app_site2/config/config_fed_client.json"] = client_cfg("2")  # type: ignore[arg-type]
    with pytest.raises(JobSpecError) as e:
        parse_job(files)
    assert e.value.file == "app_site2/config/config_fed_client.json"
    assert "executors[0].executor.args.delta" in str(e.value)


# --- refusals --------------------------------------------------------------------------------


def drop(name: str) -> Callable[[Files], Files]:
    def f(files: Files) -> Files:
        out = dict(files)
        del out[name]
        return out
    return f


def replace_file(name: str, data: bytes) -> Callable[[Files], Files]:
    def f(files: Files) -> Files:
        return {**files, name: data}
    return f


def meta(fn: Callable[[dict[str, Any]], None]) -> Callable[[Files], Files]:
    return lambda files: edit(files, "meta.json", fn)


def server(fn: Callable[[dict[str, Any]], None]) -> Callable[[Files], Files]:
    return lambda files: edit(files, SFILE, fn)


def client(fn: Callable[[dict[str, Any]], None]) -> Callable[[Files], Files]:
    return lambda files: edit(files, CFILE, fn)


def set_sag(**kw: Any) -> Callable[[Files], Files]:
    return server(lambda c: sag_args(c).update(kw))


def set_agg(**kw: Any) -> Callable[[Files], Files]:
    return server(lambda c: comp(c, "aggregator")["args"].update(kw))


def set_trainer_args(**kw: Any) -> Callable[[Files], Files]:
    return client(lambda c: c["executors"][0]["executor"]["args"].update(kw))


AGG = "components[2].args"
SAGA = "workflows[0].args"
INVALID: list[tuple[str, Callable[[Files], Files], str, str]] = [
    ("missing meta.json", drop("meta.json"), "meta.json", "-"),
    ("meta.json not JSON", replace_file("meta.json", b"{name: hello"), "meta.json", "-"),
    ("meta.json not an object", replace_file("meta.json", b"[1]"), "meta.json", "-"),
    ("meta.json not UTF-8", replace_file("meta.json", b"\xff\xfe{"), "meta.json", "-"),
    ("missing name", meta(lambda m: m.pop("name")), "meta.json", "name"),
    ("empty name", meta(lambda m: m.update(name="")), "meta.json", "name"),
    ("deploy_map to missing app", meta(lambda m: m["deploy_map"].update(ghost=["site-1"])), "meta.json",
     "deploy_map.ghost"),
    ("deploy_map not a map", meta(lambda m: m.update(deploy_map=["app"])), "meta.json", "deploy_map"),
    ("deploy_map sites not a list", meta(lambda m: m.update(deploy_map={"app": "@ALL"})), "meta.json",
     "deploy_map.app"),
    ("no server app", meta(lambda m: m.update(deploy_map={"app": ["site-1", "site-2"]})), "meta.json",
     "deploy_map"),
    ("min_clients 0", meta(lambda m: m.update(min_clients=0)), "meta.json", "min_clients"),
    ("min_clients string", meta(lambda m: m.update(min_clients="2")), "meta.json", "min_clients"),
    ("resource_spec list", meta(lambda m: m.update(resource_spec=[])), "meta.json", "resource_spec"),
    ("missing server config", drop(SFILE), SFILE, "-"),
    ("server format_version 1", server(lambda c: c.update(format_version=1)), SFILE, "format_version"),
    ("client format_version 1", client(lambda c: c.update(format_version=1)), CFILE, "format_version"),
    ("two workflows", server(lambda c: c["workflows"].append(dict(c["workflows"][0]))), SFILE, "workflows[1].path"),
    ("three workflows", server(lambda c: c["workflows"].extend([c["workflows"][0]] * 2)), SFILE, "workflows"),
    ("no workflow", server(lambda c: c.update(workflows=[])), SFILE, "workflows"),
    ("unknown workflow path", server(lambda c: c["workflows"][0].update(
        path="nvflare.app_common.workflows.cross_site_model_eval.CrossSiteModelEval")), SFILE,
     "workflows[0].path"),
    ("unknown component path", server(lambda c: c["components"][0].update(path="my.Persistor")), SFILE,
     "components[0].path"),
    ("component without id", server(lambda c: c["components"][1].pop("id")), SFILE, "components[1].id"),
    ("component args not an object", server(lambda c: c["components"][1].update(args=[])), SFILE,
     "components[1].args"),
    ("SAG min_clients string", set_sag(min_clients="2"), SFILE, f"{SAGA}.min_clients"),
    ("SAG min_clients bool", set_sag(min_clients=True), SFILE, f"{SAGA}.min_clients"),
    ("SAG min_clients float", set_sag(min_clients=2.0), SFILE, f"{SAGA}.min_clients"),
    ("SAG negative num_rounds", set_sag(num_rounds=-1), SFILE, f"{SAGA}.num_rounds"),
    ("SAG negative train_timeout", set_sag(train_timeout=-5), SFILE, f"{SAGA}.train_timeout"),
    ("SAG unknown argument", set_sag(min_client=2), SFILE, f"{SAGA}.min_client"),
    ("SAG ignore_result_error string", set_sag(ignore_result_error="yes"), SFILE, f"{SAGA}.ignore_result_error"),
    ("SAG train_task_name number", set_sag(train_task_name=1), SFILE, f"{SAGA}.train_task_name"),
    ("aggregator_id names nothing", set_sag(aggregator_id="agg"), SFILE, f"{SAGA}.aggregator_id"),
    ("aggregator_id names the persistor", set_sag(aggregator_id="persistor"), SFILE, f"{SAGA}.aggregator_id"),
    ("persistor_id names the aggregator", set_sag(persistor_id="aggregator"), SFILE, f"{SAGA}.persistor_id"),
    ("generator id names nothing", set_sag(shareable_generator_id="gen"), SFILE,
     f"{SAGA}.shareable_generator_id"),
    ("generator with args", server(lambda c: comp(c, "shareable_generator").update(args={"x": 1})), SFILE,
     "components[1].args"),
    ("expected_data_kind METRICS", set_agg(expected_data_kind="METRICS"), SFILE, f"{AGG}.expected_data_kind"),
    ("bad exclude_vars regex", set_agg(exclude_vars="(unclosed"), SFILE, f"{AGG}.exclude_vars"),
    ("exclude_vars not a string", set_agg(exclude_vars=["a"]), SFILE, f"{AGG}.exclude_vars"),
    ("aggregation weight negative", set_agg(aggregation_weights={"site-1": -1.0}), SFILE,
     f"{AGG}.aggregation_weights.site-1"),
    ("aggregation weight string", set_agg(aggregation_weights={"site-1": "1"}), SFILE,
     f"{AGG}.aggregation_weights.site-1"),
    ("aggregation_weights a list", set_agg(aggregation_weights=[1, 2]), SFILE, f"{AGG}.aggregation_weights"),
    ("weigh_by_local_iter string", set_agg(weigh_by_local_iter="true"), SFILE, f"{AGG}.weigh_by_local_iter"),
    ("unknown aggregator argument", set_agg(foo=1), SFILE, f"{AGG}.foo"),
    ("persistor model_dir ../x", server(lambda c: comp(c, "persistor")["args"].update(model_dir="../x")), SFILE,
     "components[0].args.model_dir"),
    ("persistor model_dir absolute", server(lambda c: comp(c, "persistor")["args"].update(model_dir="/etc")),
     SFILE, "components[0].args.model_dir"),
    ("persistor model_name a/../../b", server(lambda c: comp(c, "persistor")["args"].update(
        model_name="a/../../b.npy")), SFILE, "components[0].args.model_name"),
    ("persistor source_ckpt", server(lambda c: comp(c, "persistor")["args"].update(
        source_ckpt_file_full_name="/x.pt")), SFILE, "components[0].args.source_ckpt_file_full_name"),
    ("persistor model not a list", server(lambda c: comp(c, "persistor")["args"].update(model="1,2")), SFILE,
     "components[0].args.model"),
    ("missing client config", drop(CFILE), CFILE, "-"),
    ("executors empty", client(lambda c: c.update(executors=[])), CFILE, "executors"),
    ("executor tasks empty", client(lambda c: c["executors"][0].update(tasks=[])), CFILE, "executors[0].tasks"),
    ("executor path unknown, not in custom/", client(lambda c: c["executors"][0]["executor"].update(
        path="my_trainer.Trainer")), CFILE, "executors[0].executor.path"),
    ("executor path without module", client(lambda c: c["executors"][0]["executor"].update(path="Trainer")),
     CFILE, "executors[0].executor.path"),
    ("executor is the SAG workflow", client(lambda c: c["executors"][0]["executor"].update(path=SAG)), CFILE,
     "executors[0].executor.path"),
    ("NPTrainer unknown arg", set_trainer_args(learning_rate=0.1), CFILE,
     "executors[0].executor.args.learning_rate"),
    ("NPTrainer delta string", set_trainer_args(delta="1"), CFILE, "executors[0].executor.args.delta"),
    ("NPTrainer negative sleep_time", set_trainer_args(sleep_time=-1), CFILE,
     "executors[0].executor.args.sleep_time"),
]


@pytest.mark.parametrize(("case", "mutate", "file", "field"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_job_raises_jobspecerror_naming_file_and_field(case: str, mutate: Callable[[Files], Files],
                                                              file: str, field: str) -> None:
    files = mutate(hello_files())
    with pytest.raises(JobSpecError) as e:
        parse_job(files)
    err = e.value
    assert err.file == file, case
    assert err.field == field, case
    assert str(err).startswith(f"{file}: {field}: ")
    assert err.problem


def test_aggregator_id_naming_persistor_says_what_it_is() -> None:
    with pytest.raises(JobSpecError, match="NPModelPersistor"):
        parse_job(set_sag(aggregator_id="persistor")(hello_files()))


def test_nan_aggregation_weight_is_refused() -> None:
    # json.loads accepts NaN; a NaN weight would turn the whole aggregate into NaN.
    files = hello_files()
    cfg = json.loads(files[SFILE])
    comp(cfg, "aggregator")["args"]["aggregation_weights"]["site-1"] = float("nan")
    files[SFILE] = json.dumps(cfg).encode()
    assert b"NaN" in files[SFILE]
    with pytest.raises(JobSpecError) as e:
        parse_job(files)
    assert e.value.field == f"{AGG}.aggregation_weights.site-1"


def test_nan_wait_time_is_refused() -> None:
    files = set_sag(wait_time_after_min_received=float("nan"))(hello_files())
    with pytest.raises(JobSpecError) as e:
        parse_job(files)
    assert e.value.field == f"{SAGA}.wait_time_after_min_received"


# --- read_job_folder -------------------------------------------------------------------------


def test_read_job_folder_reads_the_real_job() -> None:
    files = hello_files()
    assert set(files) == {"meta.json", SFILE, CFILE}
    assert files["meta.json"] == (HELLO / "meta.json").read_bytes()


def test_read_job_folder_skips_pycache_and_dotfiles(tmp_path: Path) -> None:
    (tmp_path / "app" / "custom" / "__pycache__").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "meta.json").write_bytes(b"{}")
    (tmp_path / "app" / "custom" / "t.py").write_bytes(b"x = 1\n")
    (tmp_path / "app" / "custom" / "__pycache__" / "t.cpython-311.pyc").write_bytes(b"\x00")
    (tmp_path / "app" / "custom" / ".hidden.py").write_bytes(b"secret")
    (tmp_path / ".git" / "config").write_bytes(b"[core]")
    (tmp_path / ".DS_Store").write_bytes(b"\x00")
    assert read_job_folder(tmp_path) == {"meta.json": b"{}", "app/custom/t.py": b"x = 1\n"}


def test_read_job_folder_uses_posix_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c.json").write_bytes(b"1")
    assert list(read_job_folder(str(tmp_path))) == ["a/b/c.json"]


def test_read_job_folder_refuses_a_file(tmp_path: Path) -> None:
    f = tmp_path / "job.zip"
    f.write_bytes(b"PK")
    with pytest.raises(JobSpecError) as e:
        read_job_folder(f)
    assert str(f) in str(e.value)
    assert "not a directory" in str(e.value)


def test_read_job_folder_refuses_a_missing_path(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError, match="not a directory"):
        read_job_folder(tmp_path / "nope")
