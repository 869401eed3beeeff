"""Filters: NVFlare's ExcludeVars, PercentilePrivacy and SVTPrivacy, chains, and their config in a job folder."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sagmq.client.api import TaskError
from sagmq.client.apps import deploy
from sagmq.filters import (
    RC_TASK_RESULT_FILTER_ERROR,
    TASK_DATA,
    TASK_RESULT,
    ExcludeVars,
    FilterContext,
    PercentilePrivacy,
    SVTPrivacy,
)
from sagmq.filters.chain import build, parse_filters
from sagmq.filters.sides import (
    result_chain_from_wire,
    result_filters_to_wire,
    server_task_data,
    server_task_result,
)
from sagmq.job.spec import Files, parse_client_filters, parse_job, read_job_folder
from sagmq.wire.codec import DXO, METRICS, WEIGHT_DIFF, WEIGHTS
from sagmq.wire.errors import JobSpecError
from sagmq.wire.messages import RC_UNSAFE_JOB, TaskResult, TrainTask

ROOT = Path(__file__).resolve().parents[2]
SFILE = "app/config/config_fed_server.json"
CFILE = "app/config/config_fed_client.json"
NVF = "nvflare.app_common.filters"
CTX = FilterContext("site-1", "job", 0, "train", TASK_RESULT)


def model() -> dict[str, np.ndarray]:
    return {"conv.w": np.arange(6, dtype=np.float32).reshape(2, 3), "conv.b": np.ones(2, np.float32),
            "fc.w": np.full(3, 2.0, np.float32)}


# --- ExcludeVars ---------------------------------------------------------------------------------


def test_exclude_vars_list_removes_exact_names() -> None:
    out = ExcludeVars(["conv.b", "nope"]).process(DXO(WEIGHTS, model(), {"k": 1}), CTX)
    assert sorted(out.data) == ["conv.w", "fc.w"] and out.meta == {"k": 1}


def test_exclude_vars_regex_removes_matches_anywhere_in_the_name() -> None:
    out = ExcludeVars("w$").process(DXO(WEIGHT_DIFF, model()), CTX)
    assert list(out.data) == ["conv.b"]


@pytest.mark.parametrize("arg", [None, ""])
def test_exclude_vars_without_names_removes_nothing(arg: str | None) -> None:
    assert sorted(ExcludeVars(arg).process(DXO(WEIGHTS, model()), CTX).data) == sorted(model())


def test_exclude_vars_leaves_other_data_kinds_alone() -> None:
    d = DXO(METRICS, {"accuracy": np.array(0.5)})
    assert ExcludeVars(["accuracy"]).process(d, CTX) is d
    assert list(ExcludeVars(["conv.b"], data_kinds=[WEIGHT_DIFF]).process(DXO(WEIGHTS, model()), CTX).data) == \
        list(model())


def test_exclude_vars_refuses_a_kind_it_does_not_filter() -> None:
    with pytest.raises(ValueError, match="METRICS"):
        ExcludeVars(["x"], data_kinds=[METRICS])


# --- PercentilePrivacy, against NVFlare's algorithm written out --------------------------------------


def nvflare_percentile_privacy(data: dict[str, np.ndarray], steps: float, percentile: float,
                               gamma: float) -> dict[str, np.ndarray]:
    """NVFlare's PercentilePrivacy.process_dxo, step by step as NVFlare documents it."""
    delta_w = {name: data[name] / steps for name in data}
    all_abs = np.concatenate([np.abs(delta_w[name].ravel()) for name in delta_w])
    cutoff = np.percentile(a=all_abs, q=percentile, overwrite_input=False)
    for name in delta_w:
        diff_w = delta_w[name]
        if np.ndim(diff_w) == 0:
            delta_w[name] = diff_w * steps
            continue
        selector = (diff_w > -cutoff) & (diff_w < cutoff)
        diff_w[selector] = 0.0
        diff_w = np.clip(diff_w, a_min=-gamma, a_max=gamma)
        delta_w[name] = diff_w * steps
    return delta_w


@pytest.mark.parametrize(("percentile", "gamma", "steps"), [(10, 0.01, 1), (50, 0.05, 3), (90, 1.0, 2.5), (0, 0.2, 1),
                                                            (100, 0.02, 1)])
def test_percentile_privacy_equals_nvflares_algorithm(percentile: float, gamma: float, steps: float) -> None:
    rng = np.random.default_rng(7)
    data: dict[str, np.ndarray] = {"a": rng.normal(0, 0.05, (8, 5)).astype(np.float32), "b": rng.normal(0, 0.1, 17),
                                   "s": np.array(0.3, np.float32)}
    expected = nvflare_percentile_privacy({k: v.copy() for k, v in data.items()}, steps, percentile, gamma)
    frozen = {k: v.copy() for k, v in data.items()}
    for v in data.values():
        v.flags.writeable = False  # a decoded body's arrays are read-only: the filter must not write them
    out = PercentilePrivacy(percentile, gamma).process(DXO(WEIGHT_DIFF, data, {"NUM_STEPS_CURRENT_ROUND": steps}),
                                                        CTX)
    assert sorted(out.data) == sorted(expected)
    for k in expected:
        assert out.data[k].dtype == expected[k].dtype
        np.testing.assert_array_equal(out.data[k], expected[k])
        np.testing.assert_array_equal(data[k], frozen[k])
    if percentile > 0:  # (percentile 0 with a large gamma keeps every value: nothing is below the minimum)
        assert not np.array_equal(out.data["a"], data["a"])  # it did change the update


@pytest.mark.parametrize(("percentile", "gamma"), [(10, 0), (10, -1), (-1, 0.1), (101, 0.1)])
def test_percentile_privacy_out_of_range_does_nothing_as_nvflare(percentile: float, gamma: float) -> None:
    d = DXO(WEIGHT_DIFF, model())
    assert PercentilePrivacy(percentile, gamma).process(d, CTX) is d


# --- SVTPrivacy ----------------------------------------------------------------------------------------


def test_svt_privacy_releases_a_fraction_clipped_and_noised() -> None:
    rng = np.random.default_rng(3)
    data = {"w": rng.normal(0, 1e-4, 200), "v": rng.normal(0, 1e-4, (10, 10)), "s": np.array(5.0)}
    steps, gamma = 2.0, 1e-4
    f = SVTPrivacy(fraction=0.1, epsilon=1.0, noise_var=1.0, gamma=gamma, tau=1e-6, replace=False,
                   rng=np.random.default_rng(0))
    out = f.process(DXO(WEIGHT_DIFF, data, {"NUM_STEPS_CURRENT_ROUND": steps}), CTX)
    released = np.concatenate([out.data["v"].ravel(), out.data["w"].ravel()])
    assert 0 < np.count_nonzero(released) <= 31  # ceil(301 * 0.1) entries at most (the scalar counts, as in NVFlare)
    assert np.abs(released).max() <= gamma * steps + 1e-15
    assert out.data["s"] == 5.0 and out.data["v"].shape == (10, 10)
    with pytest.raises(ValueError, match="must equal epsilon"):
        SVTPrivacy(epsilon=1.0, epsilon_threshold=0.2, epsilon_query=0.2)


def test_svt_privacy_budget_split_of_later_nvflare_releases() -> None:
    classic = SVTPrivacy(epsilon=1.0, noise_var=0.5, gamma=1e-3)
    assert classic.scales(8) == pytest.approx((1e-3 * 2 / 1.0, 1e-3 * 4 * 8 / (1.0 * 16 ** (2 / 3)), 1e-3 * 2 / 0.5))
    split = SVTPrivacy(epsilon=1.0, noise_var=0.5, gamma=1e-3, epsilon_release=2.0)
    eps_t = 1.0 / (1 + 16 ** (2 / 3))
    assert split.scales(8) == pytest.approx((1e-3 / eps_t, 1e-3 * 2 * 8 / (1.0 - eps_t), 1e-3 * 2 * 8 / 2.0))
    given = SVTPrivacy(epsilon=1.0, noise_var=0.5, gamma=1e-3, epsilon_threshold=0.25)
    assert given.scales(8) == pytest.approx((1e-3 / 0.25, 1e-3 * 2 * 8 / 0.75, 1e-3 * 2 * 8 / (8 * 0.5)))


def test_svt_privacy_is_seeded_reproducible() -> None:
    rng = np.random.default_rng(3)
    data = {"w": rng.normal(0, 1e-4, 200), "v": rng.normal(0, 1e-4, (10, 10)), "s": np.array(5.0)}
    steps, gamma = 2.0, 1e-4
    f = SVTPrivacy(fraction=0.1, epsilon=1.0, noise_var=1.0, gamma=gamma, tau=1e-6, replace=False,
                   rng=np.random.default_rng(0))
    out = f.process(DXO(WEIGHT_DIFF, data, {"NUM_STEPS_CURRENT_ROUND": steps}), CTX)
    again = SVTPrivacy(fraction=0.1, epsilon=1.0, noise_var=1.0, gamma=gamma, tau=1e-6, replace=False,
                       rng=np.random.default_rng(0)).process(DXO(WEIGHT_DIFF, data, {"NUM_STEPS_CURRENT_ROUND": steps}),
                                                             CTX)
    np.testing.assert_array_equal(again.data["w"], out.data["w"])  # seeded: reproducible


# --- chains ------------------------------------------------------------------------------------------


def test_chain_runs_the_tasks_filters_in_order_and_star_matches_every_task() -> None:
    cfg = {TASK_RESULT: [
        {"tasks": ["train"], "filters": [{"path": f"{NVF}.exclude_vars.ExcludeVars", "args": {"exclude_vars": ["fc.w"]}}]},
        {"tasks": ["*"], "filters": [{"path": "ExcludeVars", "args": {"exclude_vars": "^conv.b$"}}]},
    ]}
    chain = build(parse_filters("f.json", cfg, {}, "custom/"))
    assert list(chain.run(TASK_RESULT, DXO(WEIGHTS, model()), CTX).data) == ["conv.w"]
    other = FilterContext("site-1", "job", 0, "validate", TASK_RESULT)
    assert sorted(chain.run(TASK_RESULT, DXO(WEIGHTS, model()), other).data) == ["conv.w", "fc.w"]
    assert chain.for_task(TASK_DATA, "train") == []


def test_server_task_data_filters_the_task_before_it_leaves() -> None:
    filters = parse_filters("f.json", {TASK_DATA: [{"tasks": ["train"], "filters": [
        {"path": "ExcludeVars", "args": {"exclude_vars": ["fc.w"]}}]}]}, {}, "custom/", allow_custom=False)
    task = TrainTask("job", 0, 1, 0, "train", "task", ["site-1"], DXO(WEIGHTS, model()), {"app": ["@ALL"]}, {"app": {}})
    out = server_task_data(filters, task)
    assert out is not None and sorted(out.dxo.data) == ["conv.b", "conv.w"]


def test_server_result_filters_run_on_the_results_that_come_to_the_server() -> None:
    filters = parse_filters("f.json", {TASK_RESULT: [{"tasks": ["submit_model"], "filters": [
        {"path": "ExcludeVars", "args": {"exclude_vars": ["fc.w"]}}]}]}, {}, "custom/", allow_custom=False)
    r = TaskResult("job", 3, "submit_model", "t", "site-1", "OK", DXO(WEIGHTS, model()))
    assert sorted(server_task_result(filters, r).dxo.data) == ["conv.b", "conv.w"]  # type: ignore[union-attr]
    other = TaskResult("job", 3, "validate", "t", "site-1", "OK", DXO(METRICS, {"accuracy": np.array(0.5)}))
    assert server_task_result(filters, other) is other
    broken = TaskResult("job", 3, "submit_model", "t", "site-1", "OK", DXO(WEIGHTS, {"fc.w": np.ones(1)}))
    bad = parse_filters("f.json", {TASK_RESULT: [{"tasks": ["*"], "filters": [
        {"path": "PercentilePrivacy", "args": {}}]}]}, {}, "custom/", allow_custom=False)
    out = server_task_result(bad, replace(broken, dxo=DXO(WEIGHTS, {"s": np.array(["x"])})))
    assert out.rc == RC_TASK_RESULT_FILTER_ERROR and out.dxo is None and "PercentilePrivacy failed" in out.error


def test_server_result_filters_travel_in_round_open_and_come_back() -> None:
    filters = parse_filters("f.json", {TASK_RESULT: [{"tasks": ["train"], "filters": [
        {"path": f"{NVF}.PercentilePrivacy", "args": {"percentile": 20}}]}]}, {}, "custom/")
    wire = result_filters_to_wire(filters)
    assert wire == [{"tasks": ["train"], "path": "PercentilePrivacy", "args": {"percentile": 20}}]
    chain = result_chain_from_wire(json.loads(json.dumps(wire)))
    (f,) = chain.for_task(TASK_RESULT, "train")
    assert isinstance(f, PercentilePrivacy) and f.percentile == 20


# --- the job folder: refusals, warnings, custom filters -------------------------------------------------


def hello() -> Files:
    return read_job_folder(ROOT / "jobs" / "hello-numpy-sag")


def edit(files: Files, name: str, fn: Callable[[dict[str, Any]], None]) -> Files:
    out = dict(files)
    obj = json.loads(out[name])
    fn(obj)
    out[name] = json.dumps(obj).encode()
    return out


def result_filter(path: str, args: dict[str, Any] | None = None, tasks: list[str] | None = None) -> Callable[
        [dict[str, Any]], None]:
    return lambda c: c.update(task_result_filters=[{"tasks": ["train"] if tasks is None else tasks,
                                                    "filters": [{"path": path, "args": args or {}}]}])


REFUSED: list[tuple[str, str, Callable[[dict[str, Any]], None], str, str]] = [
    ("unknown path, client", CFILE, result_filter("no.such.Filter"), CFILE, "task_result_filters[0].filters[0].path"),
    ("unknown path, server", SFILE, result_filter("no.such.Filter"), SFILE, "task_result_filters[0].filters[0].path"),
    ("unknown data filter", CFILE, lambda c: c.update(task_data_filters=[{"tasks": ["train"], "filters": [
        {"path": "nvflare.app_common.filters.NoSuch"}]}]), CFILE, "task_data_filters[0].filters[0].path"),
    ("unknown argument", CFILE, result_filter("ExcludeVars", {"exclude": ["x"]}), CFILE,
     "task_result_filters[0].filters[0].args.exclude"),
    ("bad percentile", CFILE, result_filter(f"{NVF}.percentile_privacy.PercentilePrivacy", {"percentile": "x"}), CFILE,
     "task_result_filters[0].filters[0].args.percentile"),
    ("bad regex", SFILE, result_filter("ExcludeVars", {"exclude_vars": "(x"}), SFILE,
     "task_result_filters[0].filters[0].args.exclude_vars"),
    ("SVT epsilon split", CFILE, result_filter("SVTPrivacy", {"epsilon": 1.0, "epsilon_threshold": 0.5,
                                                               "epsilon_query": 0.1}), CFILE,
     "task_result_filters[0].filters[0].args"),
    ("bad data_kinds", CFILE, result_filter("SVTPrivacy", {"data_kinds": ["METRICS"]}), CFILE,
     "task_result_filters[0].filters[0].args.data_kinds"),
    ("no tasks", CFILE, result_filter("ExcludeVars", tasks=[]), CFILE, "task_result_filters[0].tasks"),
    ("filters not a list", CFILE, lambda c: c.update(task_result_filters={"tasks": ["train"]}), CFILE,
     "task_result_filters"),
    ("id names nothing", CFILE, lambda c: c.update(task_result_filters=[{"tasks": ["train"], "filters": ["f1"]}]),
     CFILE, "task_result_filters[0].filters[0]"),
    ("client component unknown", CFILE, lambda c: c.update(components=[{"id": "x", "path": "my.Thing"}]), CFILE,
     "components[0].path"),
    ("custom filter on the server", SFILE, result_filter("my_filters.Scrub"), SFILE,
     "task_result_filters[0].filters[0].path"),
    ("collection with a bad kind", SFILE, lambda c: c["components"][2]["args"].update(
        expected_data_kind={"model": "NOPE"}), SFILE, "components[2].args.expected_data_kind.model"),
    ("collection exclude_vars lacks a key", SFILE, lambda c: c["components"][2]["args"].update(
        expected_data_kind={"model": "WEIGHTS", "b": "WEIGHTS"}, exclude_vars={"model": "x"}), SFILE,
     "components[2].args.exclude_vars"),
    ("SAG snapshot_every_n_rounds -3", SFILE, lambda c: c["workflows"][0]["args"].update(snapshot_every_n_rounds=-3),
     SFILE, "workflows[0].args.snapshot_every_n_rounds"),
    ("SAG task_check_period 'x'", SFILE, lambda c: c["workflows"][0]["args"].update(task_check_period="x"), SFILE,
     "workflows[0].args.task_check_period"),
    ("SAG task_check_period 0", SFILE, lambda c: c["workflows"][0]["args"].update(task_check_period=0), SFILE,
     "workflows[0].args.task_check_period"),
    ("SAG memory_gc_rounds -1", SFILE, lambda c: c["workflows"][0]["args"].update(memory_gc_rounds=-1), SFILE,
     "workflows[0].args.memory_gc_rounds"),
    ("SAG allow_empty_global_weights 'no'", SFILE,
     lambda c: c["workflows"][0]["args"].update(allow_empty_global_weights="no"), SFILE,
     "workflows[0].args.allow_empty_global_weights"),
    ("SAG enable_tensor_disk_offload 1", SFILE,
     lambda c: c["workflows"][0]["args"].update(enable_tensor_disk_offload=1), SFILE,
     "workflows[0].args.enable_tensor_disk_offload"),
]


@pytest.mark.parametrize(("case", "name", "fn", "file", "fld"), REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_at_submit_naming_file_and_field(case: str, name: str, fn: Callable[[dict[str, Any]], None],
                                                 file: str, fld: str) -> None:
    files = edit(hello(), name, fn)
    if "custom filter" in case:
        files["app/custom/my_filters.py"] = b"class Scrub: pass\n"
    with pytest.raises(JobSpecError) as e:
        parse_job(files)
    assert (e.value.file, e.value.field) == (file, fld), str(e.value)


def test_ignored_sag_arguments_are_accepted_with_a_warning_each() -> None:
    files = edit(hello(), SFILE, lambda c: c["workflows"][0]["args"].update(
        task_check_period=0.5, allow_empty_global_weights=True, memory_gc_rounds=2, enable_tensor_disk_offload=False,
        snapshot_every_n_rounds=2))
    spec = parse_job(files)
    assert spec.sag.snapshot_every_n_rounds == 2  # honoured, no warning
    warned = " ".join(spec.warnings)
    for key in ("task_check_period", "allow_empty_global_weights", "memory_gc_rounds", "enable_tensor_disk_offload"):
        assert f"workflows[0].args.{key} has no effect in sagmq" in warned
    assert "snapshot_every_n_rounds" not in warned
    assert parse_job(hello()).warnings == ()


def test_an_unused_component_is_accepted_with_a_warning() -> None:
    files = edit(hello(), SFILE, lambda c: c["components"].append(
        {"id": "spare", "path": "ExcludeVars", "args": {"exclude_vars": ["x"]}}))
    (w,) = parse_job(files).warnings
    assert SFILE in w and "'spare'" in w and "no effect" in w


def test_filters_referenced_by_component_id_on_both_sides() -> None:
    comp = {"id": "drop_b", "path": f"{NVF}.exclude_vars.ExcludeVars", "args": {"exclude_vars": ["conv.b"]}}

    def add(c: dict[str, Any]) -> None:
        c["components"].append(comp)
        c["task_result_filters"] = [{"tasks": ["train"], "filters": ["drop_b"]}]

    files = edit(edit(hello(), SFILE, add), CFILE, add)
    spec = parse_job(files)
    assert spec.warnings == ()
    assert [f.path for f in spec.filters[TASK_RESULT]] == ["ExcludeVars"]
    filters, warnings = parse_client_filters(spec.client_apps()["app"])
    assert filters[TASK_RESULT][0].args == {"exclude_vars": ["conv.b"]} and warnings == []


CUSTOM_FILTER = b'''
from sagmq.filters import DXO, Filter


class Scale(Filter):
    def __init__(self, factor=2.0):
        self.factor = factor

    def process(self, dxo, ctx):
        return DXO(dxo.kind, {k: v * self.factor for k, v in dxo.data.items()}, dict(dxo.meta))
'''


def custom_job() -> Files:
    files = edit(hello(), CFILE, lambda c: c.update(task_result_filters=[{"tasks": ["train"], "filters": [
        {"path": "my_filters.Scale", "args": {"factor": 3.0}}]}]))
    files["app/custom/my_filters.py"] = CUSTOM_FILTER
    return files


def test_custom_filter_from_app_custom_runs_on_a_site_that_allows_custom_code(tmp_path: Path) -> None:
    spec = parse_job(custom_job())
    app = deploy("site-1", "job", spec.deploy_map, spec.client_apps(), tmp_path, allow_custom_code=True)
    out = app.filtered(TASK_RESULT, "site-1", "job", 0, "train", DXO(WEIGHTS, {"x": np.ones(2)}))
    np.testing.assert_array_equal(out.data["x"], [3.0, 3.0])


def test_custom_filter_is_refused_by_a_site_without_allow_custom_code(tmp_path: Path) -> None:
    spec = parse_job(custom_job())
    with pytest.raises(TaskError) as e:
        deploy("site-1", "job", spec.deploy_map, spec.client_apps(), tmp_path, allow_custom_code=False)
    assert e.value.rc == RC_UNSAFE_JOB


def test_a_failing_result_filter_gives_nvflares_return_code(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = parse_job(custom_job())
    app = deploy("site-1", "job", spec.deploy_map, spec.client_apps(), tmp_path, allow_custom_code=True)
    with caplog.at_level(logging.ERROR), pytest.raises(TaskError) as e:
        app.filtered(TASK_RESULT, "site-1", "job", 0, "train", DXO(WEIGHTS, {"x": np.array(["a"])}))
    assert e.value.rc == RC_TASK_RESULT_FILTER_ERROR and "Scale failed" in e.value.text


# --- what `sagmq submit` says -------------------------------------------------------------------------


def write_job(root: Path, files: Files) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_submit_refuses_an_unknown_filter_path_naming_file_and_field(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from sagmq.cli.main import main
    from sagmq.wire.errors import EXIT_USAGE

    job = write_job(tmp_path / "job", edit(hello(), CFILE, result_filter("no.such.Filter")))
    assert main(["submit", str(job)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"error: invalid job: {CFILE}: task_result_filters[0].filters[0].path: 'no.such.Filter'" in err


def test_submit_warns_of_a_setting_that_has_no_effect(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from sagmq.cli import main as cli

    class Admin:
        def submit(self, files: Files) -> str:
            return "f" * 32

        def close(self) -> None:
            pass

    monkeypatch.setattr(cli, "_admin", lambda s: Admin())
    job = write_job(tmp_path / "job", edit(hello(), SFILE, lambda c: c["workflows"][0]["args"].update(
        memory_gc_rounds=1)))
    assert cli.main(["submit", str(job)]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "f" * 32
    assert f"warning: {SFILE}: workflows[0].args.memory_gc_rounds has no effect in sagmq" in out.err
