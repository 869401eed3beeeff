"""Turn a job's client app (its files from the task) into executors for this site."""

from __future__ import annotations

import importlib
import logging
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from sagmq.client.api import DXO, Executor, TaskError
from sagmq.client.np_trainer import NPTrainer
from sagmq.client.np_validator import NPValidator
from sagmq.filters.base import (
    RC_TASK_DATA_FILTER_ERROR,
    RC_TASK_RESULT_FILTER_ERROR,
    TASK_DATA,
    FilterContext,
    FilterError,
)
from sagmq.filters.chain import FilterChain, build
from sagmq.job.cross_site_spec import VALIDATOR
from sagmq.job.spec import TRAINER, ExecutorSpec, app_for_site, parse_client_config, parse_client_filters
from sagmq.wire.errors import JobSpecError
from sagmq.wire.messages import RC_BAD_TASK_DATA, RC_EXECUTION_EXCEPTION, RC_TASK_UNKNOWN, RC_UNSAFE_JOB, Files

log = logging.getLogger(__name__)
_import_lock = threading.Lock()


@dataclass(slots=True)
class App:
    """A deployed app: where it lives and its executors by task name."""

    name: str
    workdir: Path
    executors: dict[str, Executor]
    filters: FilterChain = field(default_factory=lambda: FilterChain({}))  # its task_data / task_result filters

    def filtered(self, direction: str, site: str, job_id: str, rnd: int, task_name: str, dxo: DXO) -> DXO:
        """A task's DXO (TASK_DATA) or its result's (TASK_RESULT) through the app's filters for the task, in
        order; TaskError with NVFlare's filter return code if one fails (the task or result goes no further)."""
        if not self.filters.for_task(direction, task_name):
            return dxo
        try:
            return self.filters.run(direction, dxo, FilterContext(site, job_id, rnd, task_name, direction))
        except FilterError as e:
            raise TaskError(RC_TASK_DATA_FILTER_ERROR if direction == TASK_DATA else RC_TASK_RESULT_FILTER_ERROR,
                            str(e)) from e


def _load_custom(spec: ExecutorSpec, custom_dir: Path) -> Executor:
    """Import module.Class from the app's custom/ folder, without leaking it to other jobs."""
    module_name, cls_name = spec.path.rsplit(".", 1)
    with _import_lock:
        before = set(sys.modules)
        sys.path.insert(0, str(custom_dir))
        try:
            module = importlib.import_module(module_name)
            cls = getattr(module, cls_name)
        except Exception as e:
            raise TaskError(RC_EXECUTION_EXCEPTION, f"cannot load {spec.path} from custom code: {e!r}") from e
        finally:
            sys.path.remove(str(custom_dir))
            for name in set(sys.modules) - before:  # a later job may ship a module of the same name
                del sys.modules[name]
    if not (isinstance(cls, type) and issubclass(cls, Executor)):
        raise TaskError(RC_EXECUTION_EXCEPTION, f"{spec.path} is not a subclass of sagmq.client.api.Executor")
    try:
        return cls(**spec.args)
    except TypeError as e:
        raise TaskError(RC_EXECUTION_EXCEPTION, f"{spec.path}{spec.args}: {e}") from e


def deploy(
    site: str, job_id: str, deploy_map: dict[str, list[str]], apps: dict[str, Files],
    workspace: Path, allow_custom_code: bool,
) -> App:
    """Write this site's app to its workspace and build its executors, or raise TaskError."""
    app = app_for_site(deploy_map, site)
    if app is None or app not in apps:
        raise TaskError(RC_TASK_UNKNOWN, f"the job's deploy_map gives site {site} no app")
    files = apps[app]
    try:
        specs = parse_client_config(files)
        filter_specs, _ = parse_client_filters(files)
    except JobSpecError as e:
        raise TaskError(RC_BAD_TASK_DATA, f"invalid app {app}: {e}") from e
    custom_filters = any(f.custom for fs in filter_specs.values() for f in fs)
    if (any(s.custom for s in specs) or custom_filters) and not allow_custom_code:
        raise TaskError(
            RC_UNSAFE_JOB,
            f"site {site} does not run custom code (app {app} uses app/custom/); "
            "start the client with --allow-custom-code to allow it",
        )
    workdir = workspace / "jobs" / job_id / app
    if workdir.exists():
        shutil.rmtree(workdir)
    for rel, data in files.items():
        target = (workdir / rel).resolve()
        if workdir.resolve() not in target.parents:
            raise TaskError(RC_BAD_TASK_DATA, f"app file {rel!r} escapes the app folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    executors: dict[str, Executor] = {}
    for spec in specs:
        ex: Executor = (NPTrainer(**spec.args) if spec.path == TRAINER else NPValidator(**spec.args)
                        if spec.path == VALIDATOR else _load_custom(spec, workdir / "custom"))
        for task in spec.tasks:
            executors[task] = ex
    try:
        filters = build(filter_specs, workdir / "custom")
    except FilterError as e:
        raise TaskError(RC_EXECUTION_EXCEPTION, f"app {app}: {e}") from e
    log.info("deployed app %s of job %s on site %s", app, job_id, site)
    return App(app, workdir, executors, filters)
