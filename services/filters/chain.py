"""A job's filters for one side: which run for which task, built from the job's config, run in order.

The config is NVFlare's: ``task_data_filters`` and ``task_result_filters`` in
config_fed_server.json / config_fed_client.json, each a list of ``{"tasks": [...], "filters":
[...]}`` ("*" in tasks: every task). A filter is ``{"path" (or "name"): class path, "args":
{...}}``, or the id of an entry of the file's ``components`` (as a string, or ``{"id": ...}``).
NVFlare's ExcludeVars, PercentilePrivacy and SVTPrivacy resolve to sagmq's own; any other path
must be a class in the app's custom/ folder (a subclass of sagmq.filters.Filter).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import re
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sagmq.filters.base import TASK_DATA, TASK_RESULT, Filter, FilterContext, FilterError
from sagmq.filters.exclude_vars import ExcludeVars
from sagmq.filters.percentile_privacy import PercentilePrivacy
from sagmq.filters.svt_privacy import SVTPrivacy
from sagmq.wire.codec import DXO, WEIGHT_DIFF, WEIGHTS
from sagmq.wire.errors import JobSpecError

log = logging.getLogger(__name__)
_import_lock = threading.Lock()

BUILTIN: dict[str, type[Filter]] = {"ExcludeVars": ExcludeVars, "PercentilePrivacy": PercentilePrivacy,
                                    "SVTPrivacy": SVTPrivacy}
_MODULES = {"ExcludeVars": "exclude_vars", "PercentilePrivacy": "percentile_privacy", "SVTPrivacy": "svt_privacy"}
# every path a job may name a built-in filter by -> its class name
FILTER_ALIASES: dict[str, str] = {
    **{f"nvflare.app_common.filters.{m}.{c}": c for c, m in _MODULES.items()},
    **{f"nvflare.app_common.filters.{c}": c for c in _MODULES},
    **{f"sagmq.filters.{m}.{c}": c for c, m in _MODULES.items()},
    **{f"sagmq.filters.{c}": c for c in _MODULES},
    **{c: c for c in _MODULES},
}
ALL_TASKS = "*"


@dataclass(frozen=True, slots=True)
class FilterSpec:
    """One configured filter: the tasks it runs for, its class (a built-in's name, or module.Class in
    custom/), its args, and where it was configured (file and field, for messages)."""

    tasks: tuple[str, ...]
    path: str
    args: dict[str, Any]
    custom: bool
    where: str = ""

    def to_wire(self) -> dict[str, Any]:
        """As a RoundOpen carries it (built-ins only)."""
        return {"tasks": list(self.tasks), "path": self.path, "args": dict(self.args)}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> FilterSpec:
        """From a RoundOpen: a built-in filter only (FilterError otherwise)."""
        path, tasks, args = d.get("path"), d.get("tasks"), d.get("args", {})
        if path not in BUILTIN or not isinstance(tasks, list) or not isinstance(args, dict):
            raise FilterError(f"not a built-in filter entry: {dict(d)!r}")
        return cls(tuple(str(t) for t in tasks), str(path), dict(args), False, "round.open")


Filters = dict[str, list[FilterSpec]]  # TASK_DATA / TASK_RESULT -> specs, in order


# --- reading the config ------------------------------------------------------------------------


def parse_filters(file: str, cfg: Mapping[str, Any], files: Mapping[str, bytes], custom_base: str,
                  allow_custom: bool = True) -> Filters:
    """The filters a config file lists, checked; JobSpecError names the file and field at fault.
    custom_base: the custom/ folder of the app, as a prefix of the keys of files."""
    comps = _components(cfg)
    out: Filters = {TASK_DATA: [], TASK_RESULT: []}
    for direction in (TASK_DATA, TASK_RESULT):
        groups = cfg.get(direction, [])
        if not isinstance(groups, list):
            raise JobSpecError(file, direction, "must be a list of {\"tasks\": [...], \"filters\": [...]}")
        for i, g in enumerate(groups):
            fld = f"{direction}[{i}]"
            if not isinstance(g, dict):
                raise JobSpecError(file, fld, "must be an object with 'tasks' and 'filters'")
            extra = set(g) - {"tasks", "filters"}
            if extra:
                raise JobSpecError(file, f"{fld}.{sorted(extra)[0]}", "is not a filter group field "
                                   "(a group has 'tasks' and 'filters')")
            tasks = g.get("tasks")
            if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
                raise JobSpecError(file, f"{fld}.tasks", "must be a non-empty list of task names (or \"*\")")
            entries = g.get("filters")
            if not isinstance(entries, list) or not entries:
                raise JobSpecError(file, f"{fld}.filters", "must be a non-empty list of filters")
            for j, entry in enumerate(entries):
                out[direction].append(parse_filter_entry(file, f"{fld}.filters[{j}]", entry, comps, tuple(tasks),
                                                         files, custom_base, allow_custom))
    return out


def _components(cfg: Mapping[str, Any]) -> dict[str, tuple[Any, str]]:
    """The file's components by id, with their field (bad entries are the component parser's business)."""
    comps = cfg.get("components", [])
    out: dict[str, tuple[Any, str]] = {}
    if isinstance(comps, list):
        for i, c in enumerate(comps):
            if isinstance(c, dict) and isinstance(c.get("id"), str):
                out[c["id"]] = (c, f"components[{i}]")
    return out


def parse_filter_entry(file: str, fld: str, entry: Any, comps: Mapping[str, tuple[Any, str]], tasks: tuple[str, ...],
                       files: Mapping[str, bytes], custom_base: str, allow_custom: bool = True) -> FilterSpec:
    """One filter of a filter list (or a component that must be a filter), checked (JobSpecError)."""
    ref = entry if isinstance(entry, str) else entry.get("id") if isinstance(entry, dict) and set(entry) == {"id"} \
        else None
    if ref is not None:
        if ref not in comps:
            raise JobSpecError(file, fld, f"names no component with id {ref!r}")
        entry, fld = comps[ref]
    if not isinstance(entry, dict):
        raise JobSpecError(file, fld, "must be an object with 'path' (or 'name') and 'args', or a component id")
    path = entry.get("path", entry.get("name"))
    if not isinstance(path, str) or not path:
        raise JobSpecError(file, f"{fld}.path", "is missing")
    args = entry.get("args", {})
    if not isinstance(args, dict):
        raise JobSpecError(file, f"{fld}.args", "must be an object")
    builtin = FILTER_ALIASES.get(path)
    if builtin is not None:
        check_builtin_args(file, f"{fld}.args", builtin, args)
        return FilterSpec(tasks, builtin, dict(args), False, f"{file}: {fld}")
    module = path.rsplit(".", 1)[0] if "." in path else ""
    mod_file = f"{custom_base}{module.replace('.', '/')}.py"
    pkg_file = f"{custom_base}{module.replace('.', '/')}/__init__.py"
    if not module or (mod_file not in files and pkg_file not in files):
        raise JobSpecError(file, f"{fld}.path", f"{path!r} is neither a filter sagmq provides (ExcludeVars, "
                           f"PercentilePrivacy, SVTPrivacy) nor a class in {custom_base or 'custom/'}")
    if not allow_custom:
        raise JobSpecError(file, f"{fld}.path", f"{path!r}: custom filters run on sites only (sagmq runs no job "
                           "code on the server side)")
    return FilterSpec(tasks, path, dict(args), True, f"{file}: {fld}")


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


_Check = tuple[Callable[[Any], bool], str]
_KINDS: _Check = (lambda v: v is None or (isinstance(v, list) and all(k in (WEIGHTS, WEIGHT_DIFF) for k in v)),
                  "must be null or a list of WEIGHTS / WEIGHT_DIFF")
_ARGS: dict[str, dict[str, _Check]] = {
    "ExcludeVars": {
        "exclude_vars": (lambda v: v is None or isinstance(v, str) or (isinstance(v, list) and all(
            isinstance(x, str) for x in v)), "must be a list of variable names, a regular expression, or null"),
        "data_kinds": _KINDS,
    },
    "PercentilePrivacy": {
        "percentile": (lambda v: _is_num(v) and 0 <= v <= 100, "must be a number from 0 to 100"),
        "gamma": (lambda v: _is_num(v) and v > 0, "must be a number > 0"),
        "data_kinds": _KINDS,
    },
    "SVTPrivacy": {
        "fraction": (lambda v: _is_num(v) and 0 < v <= 1, "must be a number in (0, 1]"),
        "epsilon": (lambda v: _is_num(v) and v > 0, "must be a number > 0"),
        "noise_var": (lambda v: _is_num(v) and v > 0, "must be a number > 0"),
        "gamma": (lambda v: _is_num(v) and v > 0, "must be a number > 0"),
        "tau": (_is_num, "must be a number"),
        "data_kinds": _KINDS,
        "replace": (lambda v: isinstance(v, bool), "must be true or false"),
        "epsilon_threshold": (lambda v: v is None or (_is_num(v) and v > 0), "must be null or a number > 0"),
        "epsilon_query": (lambda v: v is None or (_is_num(v) and v > 0), "must be null or a number > 0"),
        "epsilon_release": (lambda v: v is None or (_is_num(v) and v > 0), "must be null or a number > 0"),
    },
}


def check_builtin_args(file: str, fld: str, name: str, args: Mapping[str, Any]) -> None:
    """Refuse an argument the built-in filter does not take, or a value it cannot use (JobSpecError)."""
    checks = _ARGS[name]
    for key, value in args.items():
        if key not in checks:
            raise JobSpecError(file, f"{fld}.{key}", f"is not a {name} argument (it takes {', '.join(checks)})")
        ok, why = checks[key]
        if not ok(value):
            raise JobSpecError(file, f"{fld}.{key}", f"{why}, got {value!r}")
    if name == "ExcludeVars" and isinstance(args.get("exclude_vars"), str):
        try:
            re.compile(args["exclude_vars"])
        except re.error as e:
            raise JobSpecError(file, f"{fld}.exclude_vars", f"invalid regular expression: {e}") from e
    try:  # what only the arguments together can say (SVTPrivacy's epsilon split)
        BUILTIN[name](**args)
    except (TypeError, ValueError) as e:
        raise JobSpecError(file, fld, f"{name}: {e}") from e


# --- building and running -----------------------------------------------------------------------


@dataclass(slots=True)
class FilterChain:
    """The built filters of one side of a job: (tasks, filter) per direction, in order."""

    chains: dict[str, list[tuple[tuple[str, ...], Filter]]]

    def __bool__(self) -> bool:
        return any(self.chains.values())

    def for_task(self, direction: str, task_name: str) -> list[Filter]:
        """The filters of a direction that run for a task, in order."""
        return [f for tasks, f in self.chains.get(direction, []) if task_name in tasks or ALL_TASKS in tasks]

    def run(self, direction: str, dxo: DXO, ctx: FilterContext) -> DXO:
        """Run the task's filters in order; FilterError names the filter that failed."""
        for f in self.for_task(direction, ctx.task_name):
            try:
                out = f.process(dxo, ctx)
            except Exception as e:  # the job's (or a filter's) failure: reported, never fatal
                raise FilterError(f"{direction} {type(f).__name__} failed: {type(e).__name__}: {e}") from e
            if not isinstance(out, DXO):
                raise FilterError(f"{direction} {type(f).__name__} returned {type(out).__name__}, not a DXO")
            dxo = out
        return dxo


def build(filters: Filters, custom_dir: Path | None = None) -> FilterChain:
    """Instantiate a side's filters (custom ones imported from custom_dir); FilterError if one cannot be."""
    chains: dict[str, list[tuple[tuple[str, ...], Filter]]] = {}
    for direction, specs in filters.items():
        chains[direction] = [(s.tasks, _instantiate(s, custom_dir)) for s in specs]
    return FilterChain(chains)


def _instantiate(spec: FilterSpec, custom_dir: Path | None) -> Filter:
    if spec.custom:
        if custom_dir is None:
            raise FilterError(f"{spec.path}: custom filters run on sites only")
        cls = load_custom_class(spec.path, custom_dir)
        if not (inspect.isclass(cls) and issubclass(cls, Filter)):
            raise FilterError(f"{spec.path} is not a subclass of sagmq.filters.Filter")
    else:
        cls = BUILTIN[spec.path]
    try:
        return cls(**spec.args)
    except (TypeError, ValueError) as e:
        raise FilterError(f"{spec.path}{spec.args}: {e}") from e


def load_custom_class(path: str, custom_dir: Path) -> Any:
    """module.Class from a job's custom/ folder, without leaving the module to later jobs."""
    module_name, cls_name = path.rsplit(".", 1)
    with _import_lock:
        before = set(sys.modules)
        sys.path.insert(0, str(custom_dir))
        try:
            return getattr(importlib.import_module(module_name), cls_name)
        except Exception as e:
            raise FilterError(f"cannot load {path} from custom code: {e!r}") from e
        finally:
            sys.path.remove(str(custom_dir))
            for name in set(sys.modules) - before:  # a later job may ship a module of the same name
                del sys.modules[name]
