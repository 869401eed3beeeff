"""The example job folders that ship with sagmq (package data, so an installed wheel has them)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from sagmq.wire.errors import SagmqError


def examples_dir() -> Path:
    """The folder that holds the bundled example jobs (jobs/ of a checkout, or inside the wheel)."""
    root = resources.files("sagmq.examples")
    return Path(str(root))


def example_job(name: str) -> Path:
    """The folder of one bundled example job, e.g. ``hello-numpy-sag``."""
    path = examples_dir() / name
    if not (path / "meta.json").is_file():
        raise SagmqError(f"no bundled example job {name!r} in {examples_dir()}")
    return path
