"""NVFlare job folders: reading, validating, and resolving component paths.

A job folder holds ``meta.json`` (name, deploy_map, min_clients, resource_spec) and one
folder per app with ``config/config_fed_server.json`` and/or
``config/config_fed_client.json`` (format_version 2) and optional ``custom/`` code.
NVFlare's component paths resolve to sagmq's implementations; every problem is reported
as JobSpecError naming the file and the field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagmq.filters.chain import FILTER_ALIASES, Filters, check_builtin_args, parse_filter_entry, parse_filters
from sagmq.job.collection_spec import CollectionConfigError, KeySettings, resolve_collection
from sagmq.job.cross_site_spec import (
    CSE,
    CSE_CLASSES,
    CSE_NVFLARE,
    VALIDATOR,
    CSEConfig,
    cse_warnings,
    implicit_components,
    parse_validator_args,
    resolve_cse,
)
from sagmq.wire.codec import COLLECTION, WEIGHT_DIFF, WEIGHTS
from sagmq.wire.errors import JobSpecError

Files = dict[str, bytes]
MAX_JOB_BYTES = 16 * 2**20
ALL_SITES = "@ALL"
SERVER = "server"

SAG = "ScatterAndGather"
AGGREGATOR = "InTimeAccumulateWeightedAggregator"
GENERATOR = "FullModelShareableGenerator"
PERSISTOR = "NPModelPersistor"
TRAINER = "NPTrainer"

# The class each component stands for: sagmq's own implementation, by import path.
CLASSES: dict[str, str] = {
    SAG: "sagmq.server.scatter_and_gather.ScatterAndGather",
    AGGREGATOR: "sagmq.aggregator.intime_accumulate_weighted_aggregator.InTimeAccumulateWeightedAggregator",
    GENERATOR: "sagmq.server.full_model_shareable_generator.FullModelShareableGenerator",
    PERSISTOR: "sagmq.persistor.np_model_persistor.NPModelPersistor",
    TRAINER: "sagmq.client.np_trainer.NPTrainer",
    **CSE_CLASSES,  # cross-site evaluation (sagmq.job.cross_site_spec)
}

# NVFlare's component paths (and their package shortcuts), so an NVFlare job folder runs unchanged.
_NVFLARE: dict[str, str] = {
    "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather": SAG,
    "nvflare.app_common.workflows.ScatterAndGather": SAG,
    "nvflare.app_common.aggregators.intime_accumulate_model_aggregator.InTimeAccumulateWeightedAggregator": AGGREGATOR,
    "nvflare.app_common.aggregators.InTimeAccumulateWeightedAggregator": AGGREGATOR,
    "nvflare.app_common.shareablegenerators.full_model_shareable_generator.FullModelShareableGenerator": GENERATOR,
    "nvflare.app_common.shareablegenerators.FullModelShareableGenerator": GENERATOR,
    "nvflare.app_common.np.np_model_persistor.NPModelPersistor": PERSISTOR,
    "nvflare.app_common.np.np_trainer.NPTrainer": TRAINER,
    **CSE_NVFLARE,
}

# Every path a job may name a component by (NVFlare's, sagmq's own, the bare class name) -> the import
# path of the sagmq class that runs it.
ALIASES: dict[str, str] = {
    **{path: CLASSES[name] for path, name in _NVFLARE.items()},
    **{path: path for path in CLASSES.values()},
    **{name: path for name, path in CLASSES.items()},
}


def component_name(path: str) -> str | None:
    """The component a job's class path names (SAG, AGGREGATOR, ...), or None if sagmq has none by that path."""
    target = ALIASES.get(path)
    return None if target is None else target.rsplit(".", 1)[1]


# SAG arguments NVFlare accepts that have no effect in sagmq: checked as NVFlare checks them, and a job
# that sets one is told so (JobSpec.warnings; the README lists them)
_SAG_IGNORED = {
    "task_check_period": "sagmq reacts to messages; there is no task polling period",
    "allow_empty_global_weights": "the persistor always gives a model (saved, checkpoint, config or default)",
    "memory_gc_rounds": "the services free each round's buffers as they go; there is no gc cycle to tune",
    "enable_tensor_disk_offload": "large results are streamed part by part, never held whole",
}


@dataclass(frozen=True, slots=True)
class SAGConfig:
    """ScatterAndGather's arguments, with NVFlare's defaults."""

    min_clients: int = 1000
    num_rounds: int = 5
    start_round: int = 0
    wait_time_after_min_received: float = 10.0
    train_timeout: float = 0.0
    ignore_result_error: bool | None = None
    persist_every_n_rounds: int = 1
    snapshot_every_n_rounds: int = 1
    train_task_name: str = "train"
    aggregator_id: str = "aggregator"
    persistor_id: str = ""
    shareable_generator_id: str = "shareable_generator"


@dataclass(frozen=True, slots=True)
class AggregatorConfig:
    """InTimeAccumulateWeightedAggregator's arguments."""

    expected_data_kind: str = WEIGHT_DIFF  # COLLECTION when the job gave a dict: collection holds the keys
    aggregation_weights: dict[str, float] = field(default_factory=dict)
    exclude_vars: str = ""
    weigh_by_local_iter: bool = True
    collection: dict[str, KeySettings] = field(default_factory=dict)  # NVFlare's collection mode, per key


@dataclass(frozen=True, slots=True)
class PersistorConfig:
    """NPModelPersistor's arguments."""

    model_dir: str = "models"
    model_name: str = "server.npy"
    model: list[Any] | None = None
    source_ckpt_file_full_name: str = ""


@dataclass(frozen=True, slots=True)
class ExecutorSpec:
    """One executor of a client app: the tasks it serves and what runs them."""

    tasks: tuple[str, ...]
    path: str
    args: dict[str, Any]
    custom: bool


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A validated job."""

    name: str
    meta: dict[str, Any]
    deploy_map: dict[str, list[str]]
    min_clients: int
    server_app: str
    sag: SAGConfig
    aggregator: AggregatorConfig
    persistor: PersistorConfig | None
    files: Files
    cse: CSEConfig | None = None
    filters: Filters = field(default_factory=dict)  # the server's task_data_filters / task_result_filters
    warnings: tuple[str, ...] = ()  # settings accepted that have no effect in sagmq (README), for the submitter  # a CrossSiteModelEval workflow after ScatterAndGather

    def client_apps(self) -> dict[str, Files]:
        """Files of every app deployed to sites, keyed by app name."""
        out: dict[str, Files] = {}
        for app, sites in self.deploy_map.items():
            if any(s != SERVER for s in sites):
                prefix = f"{app}/"
                out[app] = {p[len(prefix):]: b for p, b in self.files.items() if p.startswith(prefix)}
        return out

    def site_allowed(self, site: str) -> bool:
        """Whether the deploy map gives this site an app."""
        return app_for_site(self.deploy_map, site) is not None


def app_for_site(deploy_map: dict[str, list[str]], site: str) -> str | None:
    """The app a site runs: the one naming it, else the one deployed to @ALL."""
    for app, sites in deploy_map.items():
        if site in sites:
            return app
    for app, sites in deploy_map.items():
        if ALL_SITES in sites:
            return app
    return None


def read_job_folder(path: str | Path) -> Files:
    """All files of a job folder as {relative posix path: bytes}, skipping caches."""
    root = Path(path)
    if not root.is_dir():
        raise JobSpecError(str(root), "-", "is not a directory")
    files: Files = {}
    total = 0
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts) or not p.is_file():
            continue
        data = p.read_bytes()
        total += len(data)
        if total > MAX_JOB_BYTES:
            raise JobSpecError(str(root), "-", f"job folder exceeds {MAX_JOB_BYTES} bytes")
        files[rel.as_posix()] = data
    return files


def _json(files: Files, name: str) -> dict[str, Any]:
    if name not in files:
        raise JobSpecError(name, "-", "file is missing")
    try:
        obj = json.loads(files[name])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JobSpecError(name, "-", f"not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise JobSpecError(name, "-", "must hold a JSON object")
    return obj


def _num(file: str, fld: str, v: Any, minimum: float = 0, integer: bool = False) -> Any:
    ok = isinstance(v, int) if integer else isinstance(v, int | float)
    if not ok or isinstance(v, bool) or not math.isfinite(v) or v < minimum:
        kind = "an integer" if integer else "a number"
        raise JobSpecError(file, fld, f"must be {kind} >= {minimum}, got {v!r}")
    return v


def _str(file: str, fld: str, v: Any) -> str:
    if not isinstance(v, str):
        raise JobSpecError(file, fld, f"must be a string, got {v!r}")
    return v


def component_path(file: str, fld: str, comp: Any) -> str:
    """The class path of a component entry ('path', or NVFlare's 'name')."""
    if not isinstance(comp, dict):
        raise JobSpecError(file, fld, "must be an object with 'path' (or 'name') and 'args'")
    path = comp.get("path", comp.get("name"))
    if not isinstance(path, str) or not path:
        raise JobSpecError(file, f"{fld}.path", "is missing")
    args = comp.get("args", {})
    if not isinstance(args, dict):
        raise JobSpecError(file, f"{fld}.args", "must be an object")
    return path


def _check_format(file: str, cfg: dict[str, Any]) -> None:
    if cfg.get("format_version", 2) != 2:
        raise JobSpecError(file, "format_version", f"must be 2, got {cfg.get('format_version')!r}")


def parse_sag(file: str, args: dict[str, Any]) -> SAGConfig:
    """Validate ScatterAndGather's args as NVFlare does."""
    d = SAGConfig()
    unknown = set(args) - set(SAGConfig.__dataclass_fields__) - set(_SAG_IGNORED)
    if unknown:
        raise JobSpecError(file, f"workflows[0].args.{sorted(unknown)[0]}", "is not a ScatterAndGather argument")
    f = f"{file}"
    a = "workflows[0].args."
    ire = args.get("ignore_result_error", d.ignore_result_error)
    if ire is not None and not isinstance(ire, bool):
        raise JobSpecError(f, a + "ignore_result_error", "must be true, false or null")
    _check_sag_ignored(f, a, args)
    return SAGConfig(
        min_clients=_num(f, a + "min_clients", args.get("min_clients", d.min_clients), 1, True),
        num_rounds=_num(f, a + "num_rounds", args.get("num_rounds", d.num_rounds), 0, True),
        start_round=_num(f, a + "start_round", args.get("start_round", d.start_round), 0, True),
        wait_time_after_min_received=float(
            _num(f, a + "wait_time_after_min_received", args.get("wait_time_after_min_received", 10))
        ),
        train_timeout=float(_num(f, a + "train_timeout", args.get("train_timeout", 0))),
        ignore_result_error=ire,
        persist_every_n_rounds=_num(f, a + "persist_every_n_rounds", args.get("persist_every_n_rounds", 1), 0, True),
        snapshot_every_n_rounds=_num(f, a + "snapshot_every_n_rounds", args.get("snapshot_every_n_rounds", 1), 0,
                                     True),
        train_task_name=_str(f, a + "train_task_name", args.get("train_task_name", d.train_task_name)),
        aggregator_id=_str(f, a + "aggregator_id", args.get("aggregator_id", d.aggregator_id)),
        persistor_id=_str(f, a + "persistor_id", args.get("persistor_id", d.persistor_id)),
        shareable_generator_id=_str(
            f, a + "shareable_generator_id", args.get("shareable_generator_id", d.shareable_generator_id)
        ),
    )


def _check_sag_ignored(f: str, a: str, args: dict[str, Any]) -> None:
    """The SAG arguments sagmq ignores still get NVFlare's checks: a value NVFlare refuses is refused."""
    if "task_check_period" in args:
        v = args["task_check_period"]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
            raise JobSpecError(f, a + "task_check_period", f"must be a number > 0, got {v!r}")
    if "memory_gc_rounds" in args:
        _num(f, a + "memory_gc_rounds", args["memory_gc_rounds"], 0, True)
    for key in ("allow_empty_global_weights", "enable_tensor_disk_offload"):
        if key in args and not isinstance(args[key], bool):
            raise JobSpecError(f, a + key, f"must be true or false, got {args[key]!r}")


def sag_warnings(file: str, args: dict[str, Any]) -> list[str]:
    """A warning for each ScatterAndGather argument set that has no effect in sagmq."""
    return [f"{file}: workflows[0].args.{k} has no effect in sagmq ({why})"
            for k, why in _SAG_IGNORED.items() if k in args]


def _parse_collection(file: str, fld: str, args: dict[str, Any]) -> AggregatorConfig:
    """expected_data_kind as a dict (NVFlare's collection mode): every key's kind, weights and exclude_vars,
    by NVFlare's rules (sagmq.aggregator.collection)."""
    try:
        keys = resolve_collection(args["expected_data_kind"], args.get("aggregation_weights"),
                                  args.get("exclude_vars"))
    except CollectionConfigError as e:
        raise JobSpecError(file, f"{fld}.{e.field}", e.problem) from e
    wbl = args.get("weigh_by_local_iter", True)
    if not isinstance(wbl, bool):
        raise JobSpecError(file, f"{fld}.weigh_by_local_iter", "must be true or false (one flag for every key)")
    return AggregatorConfig(COLLECTION, {}, "", wbl, keys)


def parse_aggregator(file: str, fld: str, args: dict[str, Any]) -> AggregatorConfig:
    """Validate InTimeAccumulateWeightedAggregator's args."""
    unknown = set(args) - (set(AggregatorConfig.__dataclass_fields__) - {"collection"})
    if unknown:
        raise JobSpecError(file, f"{fld}.{sorted(unknown)[0]}", "is not an aggregator argument")
    kind = args.get("expected_data_kind", WEIGHT_DIFF)
    if isinstance(kind, dict):
        return _parse_collection(file, fld, args)
    if kind not in (WEIGHTS, WEIGHT_DIFF):
        raise JobSpecError(file, f"{fld}.expected_data_kind", f"must be WEIGHTS or WEIGHT_DIFF, got {kind!r}")
    weights = args.get("aggregation_weights") or {}
    if not isinstance(weights, dict):
        raise JobSpecError(file, f"{fld}.aggregation_weights", "must map site names to numbers")
    for site, w in weights.items():
        _num(file, f"{fld}.aggregation_weights.{site}", w, 0)
    excl = args.get("exclude_vars") or ""
    if not isinstance(excl, str):
        raise JobSpecError(file, f"{fld}.exclude_vars", "must be a regular expression string")
    try:
        re.compile(excl)
    except re.error as e:
        raise JobSpecError(file, f"{fld}.exclude_vars", f"invalid regular expression: {e}") from e
    wbl = args.get("weigh_by_local_iter", True)
    if not isinstance(wbl, bool):
        raise JobSpecError(file, f"{fld}.weigh_by_local_iter", "must be true or false")
    return AggregatorConfig(kind, {str(k): float(v) for k, v in weights.items()}, excl, wbl)


def parse_persistor(file: str, fld: str, args: dict[str, Any]) -> PersistorConfig:
    """Validate NPModelPersistor's args."""
    unknown = set(args) - {"model_dir", "model_name", "model", "source_ckpt_file_full_name"}
    if unknown:
        raise JobSpecError(file, f"{fld}.{sorted(unknown)[0]}", "is not an NPModelPersistor argument")
    ckpt = args.get("source_ckpt_file_full_name") or ""
    if not isinstance(ckpt, str) or (ckpt and not ckpt.endswith((".npy", ".npz"))):
        raise JobSpecError(file, f"{fld}.source_ckpt_file_full_name", "must be the path of a .npy or .npz file")
    model_dir = _str(file, f"{fld}.model_dir", args.get("model_dir", "models"))
    model_name = _str(file, f"{fld}.model_name", args.get("model_name", "server.npy"))
    for name, v in (("model_dir", model_dir), ("model_name", model_name)):
        if not v or v.startswith("/") or ".." in Path(v).parts:
            raise JobSpecError(file, f"{fld}.{name}", f"must be a relative path inside the job, got {v!r}")
    model = args.get("model")
    if model is not None and not isinstance(model, list):
        raise JobSpecError(file, f"{fld}.model", "must be a (nested) list of numbers")
    return PersistorConfig(model_dir, model_name, model, ckpt)


def parse_trainer_args(file: str, fld: str, args: dict[str, Any]) -> dict[str, Any]:
    """Validate NPTrainer's args."""
    known = {"delta", "sleep_time", "train_task_name", "submit_model_task_name", "model_name", "model_dir"}
    unknown = set(args) - known
    if unknown:
        raise JobSpecError(file, f"{fld}.{sorted(unknown)[0]}", "is not an NPTrainer argument")
    if "delta" in args:
        _num(file, f"{fld}.delta", args["delta"], float("-inf"))
    if "sleep_time" in args:
        _num(file, f"{fld}.sleep_time", args["sleep_time"], 0)
    return dict(args)


def parse_client_config(files: Files, app: str = "") -> list[ExecutorSpec]:
    """The executors of a client app (files keyed relative to the job, or to the app if app='')."""
    base = f"{app}/" if app else ""
    name = f"{base}config/config_fed_client.json"
    cfg = _json(files, name)
    _check_format(name, cfg)
    execs = cfg.get("executors")
    if not isinstance(execs, list) or not execs:
        raise JobSpecError(name, "executors", "must be a non-empty list")
    out: list[ExecutorSpec] = []
    for i, e in enumerate(execs):
        fld = f"executors[{i}]"
        if not isinstance(e, dict):
            raise JobSpecError(name, fld, "must be an object with 'tasks' and 'executor'")
        tasks = e.get("tasks")
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
            raise JobSpecError(name, f"{fld}.tasks", "must be a non-empty list of task names")
        path = component_path(name, f"{fld}.executor", e.get("executor"))
        args = e["executor"].get("args", {})
        canon = component_name(path)
        if canon == TRAINER:
            out.append(ExecutorSpec(tuple(tasks), TRAINER, parse_trainer_args(name, f"{fld}.executor.args", args), False))
        elif canon == VALIDATOR:
            out.append(ExecutorSpec(tuple(tasks), VALIDATOR, parse_validator_args(name, f"{fld}.executor.args", args),
                                    False))
        elif canon is not None:
            raise JobSpecError(name, f"{fld}.executor.path", f"{path} is not an executor")
        else:
            module = path.rsplit(".", 1)[0] if "." in path else ""
            mod_file = f"{base}custom/{module.replace('.', '/')}.py"
            pkg_file = f"{base}custom/{module.replace('.', '/')}/__init__.py"
            if not module or (mod_file not in files and pkg_file not in files):
                raise JobSpecError(
                    name, f"{fld}.executor.path",
                    f"{path!r} is neither a sagmq/NVFlare executor nor a class in {base}custom/",
                )
            out.append(ExecutorSpec(tuple(tasks), path, dict(args), True))
    return out


def _parse_deploy_map(files: Files, meta: dict[str, Any]) -> dict[str, list[str]]:
    """meta.json's deploy_map: app folder -> sites, every app folder present."""
    dm = meta.get("deploy_map")
    if not isinstance(dm, dict) or not dm:
        raise JobSpecError("meta.json", "deploy_map", "must map app folders to lists of sites")
    deploy_map: dict[str, list[str]] = {}
    for app, sites in dm.items():
        if not isinstance(sites, list) or not all(isinstance(s, str) and s for s in sites):
            raise JobSpecError("meta.json", f"deploy_map.{app}", "must be a list of site names")
        if not any(p.startswith(f"{app}/") for p in files):
            raise JobSpecError("meta.json", f"deploy_map.{app}", f"app folder {app}/ does not exist")
        deploy_map[app] = list(sites)
    return deploy_map


def _parse_components(sfile: str, cfg: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any], str]]:
    """The server app's components: id -> (component name, args, field they came from)."""
    comps_raw = cfg.get("components", [])
    if not isinstance(comps_raw, list):
        raise JobSpecError(sfile, "components", "must be a list")
    comps: dict[str, tuple[str, dict[str, Any], str]] = {}
    for i, c in enumerate(comps_raw):
        fld = f"components[{i}]"
        path = component_path(sfile, fld, c)
        cid = c.get("id")
        if not isinstance(cid, str) or not cid:
            raise JobSpecError(sfile, f"{fld}.id", "is missing")
        canon = component_name(path) or FILTER_ALIASES.get(path)
        if canon is None:
            raise JobSpecError(sfile, f"{fld}.path", f"{path!r} is not a component sagmq provides")
        if canon in FILTER_ALIASES.values():  # a filter the file's filter lists name by id
            check_builtin_args(sfile, f"{fld}.args", canon, c.get("args", {}))
        comps[cid] = (canon, c.get("args", {}), fld)
    return comps


# --- filters, client components and the settings that have no effect (sagmq.filters) -------------


def _referenced(cfg: dict[str, Any]) -> set[str]:
    """Component ids the file's workflows and filter lists name (by an argument's value, or a filter's id)."""
    out: set[str] = set()

    def walk(v: Any) -> None:
        if isinstance(v, str):
            out.add(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    for key in ("workflows", "task_data_filters", "task_result_filters"):
        walk(cfg.get(key, []))
    return out


def _unused_components(file: str, cfg: dict[str, Any]) -> list[str]:
    """A warning for each component nothing in the file refers to: its args have no effect."""
    used = _referenced(cfg) | implicit_components(cfg)  # (a CrossSiteModelEval's ValidationJsonGenerator)
    comps = cfg.get("components", [])
    return [f"{file}: components[{i}] (id {c.get('id')!r}) is used by no workflow, executor or filter: "
            f"it has no effect in sagmq" for i, c in enumerate(comps if isinstance(comps, list) else [])
            if isinstance(c, dict) and c.get("id") not in used]


def parse_server_filters(files: Files, server_app: str) -> tuple[Filters, list[str]]:
    """The server app's filters (built-in ones only: sagmq runs no job code on the server side) and the
    warnings for its settings that have no effect."""
    sfile = f"{server_app}/config/config_fed_server.json"
    cfg = _json(files, sfile)
    filters = parse_filters(sfile, cfg, files, f"{server_app}/custom/", allow_custom=False)
    wfs = cfg.get("workflows")
    args = wfs[0].get("args", {}) if isinstance(wfs, list) and wfs and isinstance(wfs[0], dict) else {}
    return filters, (sag_warnings(sfile, args if isinstance(args, dict) else {}) + _unused_components(sfile, cfg)
                     + cse_warnings(sfile, cfg))


def parse_client_filters(files: Files, app: str = "") -> tuple[Filters, list[str]]:
    """A client app's filters (and, by id, its components, which must be filters: built-in, or a class in
    custom/), with a warning for each component nothing uses; files keyed as for parse_client_config."""
    base = f"{app}/" if app else ""
    name = f"{base}config/config_fed_client.json"
    cfg = _json(files, name)
    comps = cfg.get("components", [])
    if not isinstance(comps, list):
        raise JobSpecError(name, "components", "must be a list")
    for i, c in enumerate(comps):
        fld = f"components[{i}]"
        component_path(name, fld, c)
        if not isinstance(c.get("id"), str) or not c["id"]:
            raise JobSpecError(name, f"{fld}.id", "is missing")
        parse_filter_entry(name, fld, c, {}, ("*",), files, f"{base}custom/")  # a built-in's args, or custom/
    return parse_filters(name, cfg, files, f"{base}custom/"), _unused_components(name, cfg)


def _parse_workflow(sfile: str, cfg: dict[str, Any]) -> SAGConfig:
    """The server app's one workflow, which must be ScatterAndGather."""
    wfs = cfg.get("workflows")
    if not isinstance(wfs, list) or len(wfs) not in (1, 2):
        raise JobSpecError(sfile, "workflows", "must list ScatterAndGather, optionally followed by CrossSiteModelEval")
    if len(wfs) == 2 and component_name(component_path(sfile, "workflows[1]", wfs[1])) != CSE:
        raise JobSpecError(sfile, "workflows[1].path", "sagmq runs CrossSiteModelEval after ScatterAndGather, nothing else")
    wpath = component_path(sfile, "workflows[0]", wfs[0])
    if component_name(wpath) != SAG:
        raise JobSpecError(sfile, "workflows[0].path", f"{wpath!r}: sagmq runs ScatterAndGather workflows only")
    return parse_sag(sfile, wfs[0].get("args", {}))


def _parse_server_app(
    files: Files, server_app: str
) -> tuple[SAGConfig, AggregatorConfig, PersistorConfig | None]:
    """The server app's workflow and the components it names."""
    sfile = f"{server_app}/config/config_fed_server.json"
    cfg = _json(files, sfile)
    _check_format(sfile, cfg)
    comps = _parse_components(sfile, cfg)
    sag = _parse_workflow(sfile, cfg)

    def component(cid: str, want: str, fld: str) -> tuple[dict[str, Any], str]:
        if cid not in comps:
            raise JobSpecError(sfile, f"workflows[0].args.{fld}", f"names no component with id {cid!r}")
        canon, args, cfld = comps[cid]
        if canon != want:
            raise JobSpecError(sfile, f"workflows[0].args.{fld}", f"component {cid!r} is a {canon}, not a {want}")
        return args, cfld

    agg_args, agg_fld = component(sag.aggregator_id, AGGREGATOR, "aggregator_id")
    aggregator = parse_aggregator(sfile, f"{agg_fld}.args", agg_args)
    gen_args, gen_fld = component(sag.shareable_generator_id, GENERATOR, "shareable_generator_id")
    if gen_args:
        raise JobSpecError(sfile, f"{gen_fld}.args", "FullModelShareableGenerator takes no arguments")
    persistor = None
    if sag.persistor_id:
        p_args, p_fld = component(sag.persistor_id, PERSISTOR, "persistor_id")
        persistor = parse_persistor(sfile, f"{p_fld}.args", p_args)
    return sag, aggregator, persistor


def _parse_cse(files: Files, server_app: str, persistor: PersistorConfig | None) -> CSEConfig | None:
    """The server app's second workflow, CrossSiteModelEval, if it has one (sagmq.job.cross_site_spec)."""
    sfile = f"{server_app}/config/config_fed_server.json"
    cfg = _json(files, sfile)
    wfs = cfg.get("workflows")
    if not isinstance(wfs, list) or len(wfs) < 2:
        return None
    args = wfs[1].get("args", {})
    saved_as = None if persistor is None else (persistor.model_dir, persistor.model_name)
    return resolve_cse(sfile, "workflows[1]", args, _parse_components(sfile, cfg), saved_as)


def parse_job(files: Files) -> JobSpec:
    """Validate a whole job; raise JobSpecError naming the file and field at fault."""
    meta = _json(files, "meta.json")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise JobSpecError("meta.json", "name", "must be a non-empty string")
    deploy_map = _parse_deploy_map(files, meta)
    server_apps = [a for a, s in deploy_map.items() if SERVER in s or ALL_SITES in s]
    if len(server_apps) != 1:
        raise JobSpecError("meta.json", "deploy_map", "exactly one app must be deployed to 'server' or '@ALL'")
    min_clients = meta.get("min_clients", 1)
    _num("meta.json", "min_clients", min_clients, 1, True)
    resource_spec = meta.get("resource_spec", {})
    if not isinstance(resource_spec, dict):
        raise JobSpecError("meta.json", "resource_spec", "must be an object")
    sag, aggregator, persistor = _parse_server_app(files, server_apps[0])
    cse = _parse_cse(files, server_apps[0], persistor)
    filters, warnings = parse_server_filters(files, server_apps[0])
    for app, sites in deploy_map.items():
        if any(s != SERVER for s in sites):
            parse_client_config(files, app)
            warnings += parse_client_filters(files, app)[1]
    return JobSpec(
        name=name,
        meta=meta,
        deploy_map=deploy_map,
        min_clients=min_clients,
        server_app=server_apps[0],
        sag=sag,
        aggregator=aggregator,
        persistor=persistor,
        files=files,
        cse=cse,
        filters=filters,
        warnings=tuple(warnings),
    )
