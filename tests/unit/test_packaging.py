"""pyproject.toml against the tree: every package is listed, the example jobs and schemas travel as
package data, and nothing but `sagmq` is installed at the top level (read statically, nothing built)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA_PACKAGES = {"sagmq.examples": "jobs", "sagmq.schemas": "schemas"}


def pyproject() -> dict[str, Any]:
    """The parsed pyproject.toml."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def setuptools_config() -> dict[str, Any]:
    """Its [tool.setuptools] table."""
    table: dict[str, Any] = pyproject()["tool"]["setuptools"]
    return table


def code_packages() -> set[str]:
    """Every folder of services/ with an __init__.py, as its sagmq name."""
    out = set()
    for init in (ROOT / "services").rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT / "services")
        out.add(".".join(("sagmq", *rel.parts)))
    return out


def files_under(folder: Path) -> set[Path]:
    """Every file below folder (caches left out), relative to it."""
    return {p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def data_files(package: str) -> set[Path]:
    """The files setuptools ships in a package: its package-data patterns (globbed as setuptools does,
    `**` at any depth) and its Python modules."""
    folder = ROOT / setuptools_config()["package-dir"][package]
    matched = {p.relative_to(folder) for pattern in setuptools_config()["package-data"][package]
               for p in folder.glob(pattern) if p.is_file()}
    return matched | {p.relative_to(folder) for p in folder.glob("*.py")}


def test_the_package_list_is_the_tree() -> None:
    listed = setuptools_config()["packages"]
    assert len(listed) == len(set(listed)), "a package is listed twice"
    assert set(listed) == code_packages() | set(DATA_PACKAGES)


def test_only_sagmq_is_installed_at_the_top_level() -> None:
    assert {name.split(".")[0] for name in setuptools_config()["packages"]} == {"sagmq"}
    assert setuptools_config()["package-dir"] == {"sagmq": "services", **DATA_PACKAGES}


@pytest.mark.parametrize("package", sorted(DATA_PACKAGES))
def test_data_packages_are_real_packages(package: str) -> None:
    # importlib.resources.files() gives a plain folder only for a package with an __init__.py
    assert (ROOT / DATA_PACKAGES[package] / "__init__.py").is_file()


@pytest.mark.parametrize("package", sorted(DATA_PACKAGES))
def test_every_file_of_the_data_folders_is_shipped(package: str) -> None:
    folder = ROOT / DATA_PACKAGES[package]
    missing = files_under(folder) - data_files(package)
    assert not missing, f"package-data of {package} leaves out {sorted(map(str, missing))}"


def test_the_example_job_and_the_schemas_are_shipped() -> None:
    assert Path("hello-numpy-sag/meta.json") in data_files("sagmq.examples")
    schemas = {p for p in data_files("sagmq.schemas") if p.name.endswith(".schema.json")}
    assert len(schemas) >= 10


def test_the_type_marker_is_shipped() -> None:
    assert setuptools_config()["package-data"]["sagmq"] == ["py.typed"]
    assert (ROOT / "services" / "py.typed").is_file()


def test_the_sagmq_command_names_a_function_that_exists() -> None:
    module, func = pyproject()["project"]["scripts"]["sagmq"].split(":")
    assert module == "sagmq.cli.main"
    tree = ast.parse((ROOT / "services" / "cli" / "main.py").read_text())
    assert func in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_the_runtime_dependencies_are_those_the_wheel_test_provides() -> None:
    from tests.e2e.test_wheel import RUNTIME  # (import names: prometheus_client for prometheus-client)

    names = {d.split(">")[0].split("<")[0].split("=")[0].strip() for d in pyproject()["project"]["dependencies"]}
    assert {n.replace("-", "_") for n in names} == set(RUNTIME)
