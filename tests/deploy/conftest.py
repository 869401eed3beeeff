"""Fixtures of the Docker deployment tests: one image build per session, one Compose project per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.stack import ROOT, Stack

LOCAL_IMAGES = ROOT / "deploy" / "local-images.sh"


# A test here starts a whole Compose project (and the first one builds the images): more than the
# suite's default per-test timeout.
DEPLOY_TIMEOUT_S = 900


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEPLOY_TIMEOUT_S))


def _engine_problem() -> str:
    """Why no Docker engine can be used here, or "" when one answers."""
    if shutil.which("docker") is None:
        return "the docker client is not installed (Debian: apt-get install docker.io docker-compose debootstrap)"
    proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        return f"no Docker engine answers (start it as root: dockerd &): {proc.stderr.strip()[:300]}"
    return ""


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build (or reuse) the local images once per session; the env file for Compose's --env-file."""
    problem = _engine_problem()
    if problem:
        if os.environ.get("CI"):  # .ci/run starts the engine: in CI a missing one is a failure, never a skip
            pytest.fail(f"Docker deployment tests need a Docker engine: {problem}")
        pytest.skip(f"Docker deployment tests need a Docker engine: {problem}")
    env_file = tmp_path_factory.mktemp("images") / "images.env"
    started = time.monotonic()
    proc = subprocess.run([str(LOCAL_IMAGES), "--with-prometheus", "--env-file", str(env_file)],
                          capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, f"deploy/local-images.sh failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    print(f"local images ready in {time.monotonic() - started:.0f} s")
    return env_file


@pytest.fixture
def stack(images: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A Compose project of docker-compose.yml, torn down (down -v) after the test; logs shown on failure."""
    s = Stack(images, tmp_path, name=request.node.name.removeprefix("test_")[:12].replace("_", ""))
    try:
        yield s
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(s.logs("server", "aggregator", "persistor", "client", "job")[-30000:])
        s.down()
