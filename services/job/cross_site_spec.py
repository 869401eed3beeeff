"""Cross-site evaluation in a job folder: CrossSiteModelEval's arguments and the components it names.

NVFlare's hello-numpy-cross-val runs ScatterAndGather and then CrossSiteModelEval in the same job.
This module validates the second workflow's arguments as NVFlare's constructor does (the same types
and limits), resolves its model_locator_id (NPModelLocator) and formatter_id (NPFormatter), and finds
the ValidationJsonGenerator component that says where cross_val_results.json goes. Every problem is a
JobSpecError naming the file and the field.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sagmq.wire.errors import JobSpecError

log = logging.getLogger(__name__)

CSE = "CrossSiteModelEval"
LOCATOR = "NPModelLocator"
FORMATTER = "NPFormatter"
JSON_GENERATOR = "ValidationJsonGenerator"
VALIDATOR = "NPValidator"

# sagmq's implementation of each, by import path (merged into sagmq.job.spec.CLASSES)
CSE_CLASSES: dict[str, str] = {
    CSE: "sagmq.server.cross_site_model_eval.CrossSiteModelEval",
    LOCATOR: "sagmq.server.np_model_locator.NPModelLocator",
    FORMATTER: "sagmq.server.np_formatter.NPFormatter",
    JSON_GENERATOR: "sagmq.server.np_formatter.ValidationJsonGenerator",
    VALIDATOR: "sagmq.client.np_validator.NPValidator",
}

# NVFlare's paths of the same components (merged into sagmq.job.spec's table of NVFlare paths)
CSE_NVFLARE: dict[str, str] = {
    "nvflare.app_common.workflows.cross_site_model_eval.CrossSiteModelEval": CSE,
    "nvflare.app_common.workflows.CrossSiteModelEval": CSE,
    "nvflare.app_common.np.np_model_locator.NPModelLocator": LOCATOR,
    "nvflare.app_common.np.np_formatter.NPFormatter": FORMATTER,
    "nvflare.app_common.widgets.validation_json_generator.ValidationJsonGenerator": JSON_GENERATOR,
    "nvflare.app_common.np.np_validator.NPValidator": VALIDATOR,
}

SERVER_MODEL_PREFIX = "SRV_"  # NVFlare names a server model SRV_<locator name> in the results


@dataclass(frozen=True, slots=True)
class LocatorConfig:
    """NPModelLocator's arguments: model name -> file under model_dir (NVFlare's {"server": model_name})."""

    model_dir: str = "models"
    model_names: tuple[tuple[str, str], ...] = (("server", "server.npy"),)


@dataclass(frozen=True, slots=True)
class CSEConfig:
    """CrossSiteModelEval's arguments (NVFlare's defaults), with the components it names resolved."""

    task_check_period: float = 0.5
    cross_val_dir: str = "cross_site_val"
    submit_model_timeout: int = 600
    validation_timeout: int = 6000
    model_locator_id: str = ""
    formatter_id: str = ""
    submit_model_task_name: str = "submit_model"
    validation_task_name: str = "validate"
    cleanup_models: bool = False
    participating_clients: tuple[str, ...] = ()  # empty: the sites alive when it starts
    wait_for_clients_timeout: float = 300.0
    locator: LocatorConfig | None = None
    formatter: bool = False
    # ValidationJsonGenerator's results_dir / json_file_name (its defaults when the job names none)
    json_dir: str = "cross_site_val"
    json_file_name: str = "cross_val_results.json"

    @property
    def json_path(self) -> str:
        """Where cross_val_results.json goes, relative to the job's folder in the persistor's store."""
        return f"{self.json_dir}/{self.json_file_name}"


_ARGS = frozenset(f for f in CSEConfig.__dataclass_fields__ if f not in ("locator", "formatter", "json_dir",
                                                                          "json_file_name"))


def _relative(file: str, fld: str, v: Any, what: str = "a relative path inside the job") -> str:
    if not isinstance(v, str) or not v or v.startswith("/") or ".." in Path(v).parts or "\\" in v:
        raise JobSpecError(file, fld, f"must be {what}, got {v!r}")
    return v


def _nonneg(file: str, fld: str, v: Any, integer: bool) -> Any:
    ok = isinstance(v, int) if integer else isinstance(v, int | float)
    if not ok or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        kind = "an integer" if integer else "a number"
        raise JobSpecError(file, fld, f"must be {kind} >= 0 (as NVFlare requires), got {v!r}")
    return v


def _string(file: str, fld: str, v: Any) -> str:
    if not isinstance(v, str):
        raise JobSpecError(file, fld, f"must be a string, got {v!r}")
    return v


def _clients(file: str, fld: str, v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise JobSpecError(file, fld, f"must be a list of site names (or null: every site), got {v!r}")
    if len(set(v)) != len(v):
        raise JobSpecError(file, fld, "names a site twice")
    return tuple(v)


def parse_cse(file: str, fld: str, args: Mapping[str, Any]) -> CSEConfig:
    """CrossSiteModelEval's args, checked as NVFlare's constructor checks them (its types and limits)."""
    unknown = set(args) - _ARGS
    if unknown:
        raise JobSpecError(file, f"{fld}.{sorted(unknown)[0]}", "is not a CrossSiteModelEval argument")
    d = CSEConfig()
    a = f"{fld}."
    period = args.get("task_check_period", d.task_check_period)
    if not isinstance(period, float) or not math.isfinite(period) or period < 0:
        raise JobSpecError(file, a + "task_check_period",
                           f"must be a float >= 0 (NVFlare refuses an integer; write 1.0, not 1), got {period!r}")
    cleanup = args.get("cleanup_models", d.cleanup_models)
    if not isinstance(cleanup, bool):
        raise JobSpecError(file, a + "cleanup_models", f"must be true or false, got {cleanup!r}")
    sub_name = _string(file, a + "submit_model_task_name", args.get("submit_model_task_name", d.submit_model_task_name))
    val_name = _string(file, a + "validation_task_name", args.get("validation_task_name", d.validation_task_name))
    if not val_name:
        raise JobSpecError(file, a + "validation_task_name", "must name the validation task")
    if sub_name == val_name:
        raise JobSpecError(file, a + "validation_task_name", f"is the same task name as submit_model_task_name "
                                                             f"({val_name!r})")
    return CSEConfig(
        task_check_period=period,
        cross_val_dir=_relative(file, a + "cross_val_dir", args.get("cross_val_dir", d.cross_val_dir)),
        submit_model_timeout=_nonneg(file, a + "submit_model_timeout",
                                     args.get("submit_model_timeout", d.submit_model_timeout), True),
        validation_timeout=_nonneg(file, a + "validation_timeout",
                                   args.get("validation_timeout", d.validation_timeout), True),
        model_locator_id=_string(file, a + "model_locator_id", args.get("model_locator_id", d.model_locator_id)),
        formatter_id=_string(file, a + "formatter_id", args.get("formatter_id", d.formatter_id)),
        submit_model_task_name=sub_name,
        validation_task_name=val_name,
        cleanup_models=cleanup,
        participating_clients=_clients(file, a + "participating_clients", args.get("participating_clients")),
        wait_for_clients_timeout=float(_nonneg(file, a + "wait_for_clients_timeout",
                                               args.get("wait_for_clients_timeout", d.wait_for_clients_timeout),
                                               False)),
    )


def parse_locator(file: str, fld: str, args: Mapping[str, Any], saved_as: tuple[str, str] | None) -> LocatorConfig:
    """NPModelLocator's args. sagmq's locator finds the server's final global model, which the persistor saved
    as saved_as = (model_dir, model_name): a locator that points anywhere else is refused."""
    unknown = set(args) - {"model_dir", "model_name"}
    if unknown:
        raise JobSpecError(file, f"{fld}.{sorted(unknown)[0]}", "is not an NPModelLocator argument")
    model_dir = _relative(file, f"{fld}.model_dir", args.get("model_dir", "models"))
    raw = args.get("model_name", "server.npy")
    if raw is None:
        raw = "server.npy"
    if isinstance(raw, str):
        names: dict[str, Any] = {"server": raw}
    elif isinstance(raw, dict) and raw:
        names = dict(raw)
    else:
        raise JobSpecError(file, f"{fld}.model_name", f"must be a file name or a map of model names to file names, "
                                                      f"got {raw!r}")
    for name, path in names.items():
        _relative(file, f"{fld}.model_name.{name}", path, "a file name under model_dir")
    if len(names) != 1:
        raise JobSpecError(file, f"{fld}.model_name", "sagmq's NPModelLocator locates one server model (the final "
                                                      f"global model), not {len(names)}")
    (name, path), = names.items()
    if saved_as is not None and (model_dir, path) != saved_as:
        raise JobSpecError(file, f"{fld}.model_name", f"locates {model_dir}/{path}, but the persistor saves the global "
                                                      f"model as {saved_as[0]}/{saved_as[1]}: sagmq's NPModelLocator "
                                                      "locates that model only")
    return LocatorConfig(model_dir, ((name, path),))


def parse_json_generator(file: str, fld: str, args: Mapping[str, Any]) -> tuple[str, str]:
    """ValidationJsonGenerator's args: (results_dir, json_file_name)."""
    unknown = set(args) - {"results_dir", "json_file_name"}
    if unknown:
        raise JobSpecError(file, f"{fld}.{sorted(unknown)[0]}", "is not a ValidationJsonGenerator argument")
    results_dir = _relative(file, f"{fld}.results_dir", args.get("results_dir", "cross_site_val"))
    name = _relative(file, f"{fld}.json_file_name", args.get("json_file_name", "cross_val_results.json"),
                     "a file name")
    if "/" in name:
        raise JobSpecError(file, f"{fld}.json_file_name", f"must be a file name, got {name!r}")
    return results_dir, name


def parse_validator_args(file: str, fld: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """NPValidator's args (epsilon, sleep_time, validate_task_name), checked."""
    unknown = set(args) - {"epsilon", "sleep_time", "validate_task_name"}
    if unknown:
        raise JobSpecError(file, f"{fld}.{sorted(unknown)[0]}", "is not an NPValidator argument")
    for name in ("epsilon", "sleep_time"):
        if name in args:
            v = args[name]
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or \
                    (name == "sleep_time" and v < 0):
                raise JobSpecError(file, f"{fld}.{name}", f"must be a number{' >= 0' if name == 'sleep_time' else ''}, "
                                                          f"got {v!r}")
    if "validate_task_name" in args:
        _string(file, f"{fld}.validate_task_name", args["validate_task_name"])
    return dict(args)


# (component name, args, field) of a server app's components, by id (as sagmq.job.spec parses them)
Components = Mapping[str, tuple[str, dict[str, Any], str]]


def resolve_cse(file: str, fld: str, args: Mapping[str, Any], comps: Components,
                saved_as: tuple[str, str] | None) -> CSEConfig:
    """The second workflow, with its locator, formatter and the job's ValidationJsonGenerator resolved."""
    cfg = parse_cse(file, f"{fld}.args", args)

    def component(cid: str, want: str, arg: str) -> tuple[dict[str, Any], str]:
        if cid not in comps:
            raise JobSpecError(file, f"{fld}.args.{arg}", f"names no component with id {cid!r}")
        canon, cargs, cfld = comps[cid]
        if canon != want:
            raise JobSpecError(file, f"{fld}.args.{arg}", f"component {cid!r} is a {canon}, not a {want}")
        return cargs, cfld

    locator = None
    if cfg.model_locator_id:
        largs, lfld = component(cfg.model_locator_id, LOCATOR, "model_locator_id")
        locator = parse_locator(file, f"{lfld}.args", largs, saved_as)
    formatter = False
    if cfg.formatter_id:
        fargs, ffld = component(cfg.formatter_id, FORMATTER, "formatter_id")
        if fargs:
            raise JobSpecError(file, f"{ffld}.args", "NPFormatter takes no arguments")
        formatter = True
    gens = [(cargs, cfld) for canon, cargs, cfld in comps.values() if canon == JSON_GENERATOR]
    if len(gens) > 1:
        raise JobSpecError(file, gens[1][1], "a second ValidationJsonGenerator: sagmq writes one results file")
    json_dir, json_name = cfg.json_dir, cfg.json_file_name
    if gens:
        json_dir, json_name = parse_json_generator(file, f"{gens[0][1]}.args", gens[0][0])
    else:
        log.info("%s: no ValidationJsonGenerator component: cross-site results go to %s/%s all the same", file,
                 json_dir, json_name)
    return CSEConfig(**{**{f: getattr(cfg, f) for f in _ARGS}, "locator": locator, "formatter": formatter,
                        "json_dir": json_dir, "json_file_name": json_name})


def implicit_components(cfg: Mapping[str, Any]) -> set[str]:
    """Ids of the components a server config uses without naming them: CrossSiteModelEval finds the job's
    ValidationJsonGenerator by its kind (NVFlare runs it as a widget), so it is used when that workflow is."""
    wfs = cfg.get("workflows")
    comps = cfg.get("components")
    if not isinstance(wfs, list) or len(wfs) < 2 or not isinstance(comps, list):
        return set()
    paths = {p for p, canon in CSE_NVFLARE.items() if canon == JSON_GENERATOR} | {JSON_GENERATOR,
                                                                                   CSE_CLASSES[JSON_GENERATOR]}
    return {str(c.get("id")) for c in comps if isinstance(c, dict) and c.get("path", c.get("name")) in paths}


def cse_warnings(file: str, cfg: Mapping[str, Any]) -> list[str]:
    """A warning for each CrossSiteModelEval argument set that has no effect in sagmq (the others are honoured)."""
    wfs = cfg.get("workflows")
    if not isinstance(wfs, list) or len(wfs) < 2 or not isinstance(wfs[1], dict):
        return []
    args = wfs[1].get("args", {})
    if isinstance(args, dict) and "task_check_period" in args:
        return [f"{file}: workflows[1].args.task_check_period has no effect in sagmq (the server looks at its "
                "tasks on every tick, 20 times a second)"]
    return []
