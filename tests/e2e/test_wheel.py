"""The wheel as a user gets it: built from the tree, installed in a fresh venv (no system
site-packages), then `sagmq poc` run from an empty folder against the real broker.

The venv gets the five runtime dependencies without the network: a folder of links to the host's
copies of just those packages, named in a .pth file, so nothing else of the host (not its editable
sagmq, not a `services` package) can be imported there.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.broker, pytest.mark.timeout(600)]

RUNTIME = ("pika", "numpy", "msgpack", "tenacity", "prometheus_client", "rich", "xxhash")
SOURCES = ("pyproject.toml", "README.md", "services", "jobs", "schemas")  # what a build reads
EXPECTED = np.array([[4, 5, 6], [7, 8, 9], [10, 11, 12]], dtype=np.float32)


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _ok(p: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert p.returncode == 0, f"{' '.join(p.args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def _builds_without_isolation() -> bool:
    """setuptools can make a wheel here as it is: it has bdist_wheel itself (70.1 on) or `wheel` is there."""
    version = tuple(int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
    return version >= (70, 1) or importlib.util.find_spec("wheel") is not None


def build_wheel(tmp: Path) -> Path:
    """The project's wheel, built from a copy of its sources (a build writes into its source folder)."""
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    # without isolation the build uses the host's setuptools; with it, pip fetches setuptools and
    # wheel from its configured index
    isolation = ["--no-build-isolation"] if _builds_without_isolation() else []
    _ok(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", str(tmp / "dist"), str(src)], tmp))
    (wheel,) = (tmp / "dist").glob("sagmq-*.whl")
    return wheel


def make_venv(tmp: Path, wheel: Path) -> Path:
    """A fresh venv without system site-packages, with the wheel installed and the runtime dependencies linked."""
    venv = tmp / "venv"
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp))
    python = venv / "bin" / "python"
    _ok(_run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
             tmp))
    deps = tmp / "deps"
    deps.mkdir()
    for name in RUNTIME:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.submodule_search_locations, f"{name} is not installed on the host"
        folder = Path(next(iter(spec.submodule_search_locations)))
        (deps / name).symlink_to(folder, target_is_directory=True)
        libs = folder.with_name(f"{name}.libs")  # shared libraries a manylinux wheel keeps beside the package
        if libs.is_dir():
            (deps / libs.name).symlink_to(libs, target_is_directory=True)
    site = _ok(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp))
    (Path(site.stdout.strip()) / "sagmq_test_deps.pth").write_text(f"{deps}\n")
    return venv


def user_env(venv: Path, amqp_url: str, prefix: str, tmp: Path) -> dict[str, str]:
    """The environment of a user of the venv: none of the host's Python settings, the test's broker and prefix."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV") and not k.startswith("SAGMQ_")}
    (tmp / "tmp").mkdir()
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv), TMPDIR=str(tmp / "tmp"),
               SAGMQ_AMQP_URL=amqp_url, SAGMQ_PREFIX=prefix)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built once for this module's tests."""
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_the_wheel_carries_the_examples_and_schemas_and_no_services_package(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "sagmq/examples/hello-numpy-sag/meta.json" in names
    assert "sagmq/examples/hello-numpy-sag/app/config/config_fed_server.json" in names
    schemas = {p.name for p in (ROOT / "schemas").glob("*.json")}
    assert schemas and {f"sagmq/schemas/{n}" for n in schemas} <= names
    assert "sagmq/py.typed" in names
    assert {n.split("/")[0] for n in names} == {"sagmq", "sagmq-0.1.0.dist-info"}


def test_the_installed_wheel_runs_poc_from_an_empty_folder(wheel: Path, tmp_path: Path, amqp_url: str,
                                                           prefix: str) -> None:
    venv = make_venv(tmp_path, wheel)
    python = str(venv / "bin" / "python")
    empty = tmp_path / "empty"
    empty.mkdir()
    env = user_env(venv, amqp_url, prefix, tmp_path)

    no_services = _run([python, "-c", "import services"], empty, env)
    assert no_services.returncode != 0 and "No module named 'services'" in no_services.stderr
    found = json.loads(_ok(_run([python, "-c", "import json, sys, sagmq, pika, numpy, msgpack, tenacity; "
                                 "print(json.dumps([sagmq.__file__, sys.path]))"], empty, env)).stdout)
    assert Path(found[0]).is_relative_to(venv), f"sagmq comes from {found[0]}, not the venv"
    host_site = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    assert not host_site & set(found[1]) and str(ROOT) not in found[1] and str(ROOT / "services") not in found[1]

    poc = _ok(_run([str(venv / "bin" / "sagmq"), "poc", "--clients", "2", "--out", "out"], empty, env, timeout=240))
    model = empty / "out" / "models" / "server.npy"
    assert model.is_file(), poc.stdout
    np.testing.assert_array_equal(np.load(model), EXPECTED)
