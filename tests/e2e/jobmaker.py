"""Build NVFlare job folders for tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tests.conftest import JOBS

NV = "nvflare.app_common"
CUSTOM_TRAINER = JOBS / "hello-numpy-sag-custom" / "app" / "custom" / "custom_trainer.py"


def server_config(sag: dict[str, Any], aggregator: dict[str, Any] | None = None) -> dict[str, Any]:
    args = {"min_clients": 2, "num_rounds": 1, "start_round": 0, "wait_time_after_min_received": 10,
            "aggregator_id": "aggregator", "persistor_id": "persistor",
            "shareable_generator_id": "shareable_generator", "train_task_name": "train", "train_timeout": 0}
    args.update(sag)
    return {
        "format_version": 2,
        "components": [
            {"id": "persistor", "path": f"{NV}.np.np_model_persistor.NPModelPersistor", "args": {}},
            {"id": "shareable_generator",
             "path": f"{NV}.shareablegenerators.full_model_shareable_generator.FullModelShareableGenerator",
             "args": {}},
            {"id": "aggregator",
             "path": f"{NV}.aggregators.intime_accumulate_model_aggregator.InTimeAccumulateWeightedAggregator",
             "args": aggregator or {"expected_data_kind": "WEIGHTS"}},
        ],
        "workflows": [{"id": "sag", "path": f"{NV}.workflows.scatter_and_gather.ScatterAndGather", "args": args}],
    }


def np_trainer(**args: Any) -> dict[str, Any]:
    return {"format_version": 2,
            "executors": [{"tasks": ["train"], "executor": {"path": f"{NV}.np.np_trainer.NPTrainer", "args": args}}]}


def custom_trainer(**args: Any) -> dict[str, Any]:
    return {"format_version": 2,
            "executors": [{"tasks": ["train"], "executor": {"path": "custom_trainer.NPTrainer", "args": args}}]}


def make_job(root: Path, name: str, server: dict[str, Any], site_apps: dict[str, dict[str, Any]],
             min_clients: int = 1) -> Path:
    """A job with app_server for the server and one app per site (site -> client config)."""
    job = root / name
    deploy = {"app_server": ["server"]}
    _write(job / "app_server" / "config" / "config_fed_server.json", server)
    for site, client in site_apps.items():
        app = f"app_{site.replace('-', '_')}"
        deploy[app] = [site]
        _write(job / app / "config" / "config_fed_client.json", client)
        if any(e["executor"]["path"].startswith("custom_trainer") for e in client["executors"]):
            (job / app / "custom").mkdir(parents=True, exist_ok=True)
            shutil.copy(CUSTOM_TRAINER, job / app / "custom" / "custom_trainer.py")
    _write(job / "meta.json", {"name": name, "resource_spec": {}, "min_clients": min_clients, "deploy_map": deploy})
    return job


def _write(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
