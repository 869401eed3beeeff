"""Shared fixtures: a broker URL, a per-test name prefix with cleanup, and local sagmq stacks."""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from sagmq.amqp import AmqpBus
from sagmq.cli.admin import AdminClient
from sagmq.cli.procs import LocalStack
from sagmq.job.spec import read_job_folder
from sagmq.wire.bus import Bus
from sagmq.wire.errors import BrokerUnavailable, SagmqError
from sagmq.wire.settings import Settings, load_settings
from sagmq.wire.topology import service_topology, site_topology

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
SAGMQ = str(Path(sys.executable).parent / "sagmq")


def wait_for(pred: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll pred until it returns something truthy; fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def amqp_url() -> str:
    url = os.environ.get("SAGMQ_AMQP_URL", "amqp://guest:guest@localhost:5672/%2F")
    try:
        AmqpBus(Settings(amqp_url=url), "probe", connect_timeout_s=5).connect().close()
    except BrokerUnavailable as e:
        pytest.fail(f"these tests need RabbitMQ ({e}); start it with `rabbitmq-server -detached`")
    return url


@pytest.fixture
def prefix(amqp_url: str) -> Iterator[str]:
    """A name prefix of this test's own; its topology (and sites' queues) are deleted afterwards."""
    p = f"t-{uuid.uuid4().hex[:10]}"
    yield p
    bus = AmqpBus(Settings(amqp_url=amqp_url, prefix=p), "cleanup", connect_timeout_s=5).connect()
    try:
        ch = bus.channel
        for i in range(1, 11):
            for name in (f"site-{i}",):
                ch.queue_delete(site_topology(p, name).queues[0].name)
        bus.delete(service_topology(p))
    finally:
        bus.close()


@pytest.fixture
def settings(amqp_url: str, prefix: str, tmp_path: Path) -> Settings:
    # SAGMQ_PIKA_FASTPATH passes through, so a run with it off tests the bus on stock pika
    return load_settings({"SAGMQ_AMQP_URL": amqp_url, "SAGMQ_PREFIX": prefix,
                          "SAGMQ_WORKSPACE": str(tmp_path / "ws"),
                          "SAGMQ_PIKA_FASTPATH": os.environ.get("SAGMQ_PIKA_FASTPATH", "")})


class System:
    """sagmq processes started as users start them, plus an admin client."""

    def __init__(self, settings: Settings, tmp: Path) -> None:
        self.settings = settings
        self.env = {"SAGMQ_AMQP_URL": settings.amqp_url, "SAGMQ_PREFIX": settings.prefix,
                    "SAGMQ_WORKSPACE": str(settings.workspace), "SAGMQ_HEARTBEAT_S": "0.3",
                    "SAGMQ_CLIENT_TIMEOUT_S": "3", "SAGMQ_SCHEDULE_TIMEOUT_S": "20"}
        self.stack = LocalStack(self.env, tmp / "logs")
        self._admin: AdminClient | None = None

    @property
    def admin(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient(self.settings)
        return self._admin

    def start_core(self, env: dict[str, str] | None = None) -> None:
        for name in ("persistor", "aggregator", "server"):
            self.stack.start(name, name, env=env)

    def start_client(self, site: str, *extra: str, env: dict[str, str] | None = None) -> Any:
        return self.stack.start(site, "client", "--site", site, *extra, env=env)

    def start_all(self, sites: list[str], *extra: str) -> None:
        """The core services and these sites, once every site is connected."""
        self.start_core()
        for s in sites:
            self.start_client(s, *extra)
        self.wait_sites(sites)

    def launch(self, job: Path, sites: list[str], *extra: str) -> str:
        """start_all, then submit the job folder; its id."""
        self.start_all(sites, *extra)
        return self.admin.submit(read_job_folder(job))

    def alive_sites(self) -> set[str]:
        try:
            return {s["site"] for s in self.admin.status()["sites"] if s["alive"]}
        except SagmqError:
            return set()

    def wait_sites(self, sites: list[str], timeout: float = 30) -> None:
        wait_for(lambda: set(sites) <= self.alive_sites(), timeout, f"sites {sites} to connect")

    def wait_job(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        return wait_for(lambda: (lambda st: st if st["status"] in ("finished", "failed", "aborted") else None)(
            self.admin.status(job_id)), timeout, f"job {job_id} to end", 0.1)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} (rc {p.popen.poll()})\n{p.tail(40)}" for p in self.stack.procs)

    def close(self) -> None:
        self.stack.stop_all()
        if self._admin is not None:
            self._admin.close()


@pytest.fixture
def system(settings: Settings, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[System]:
    sysm = System(settings, tmp_path)
    try:
        yield sysm
    finally:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            print(sysm.logs())
        sysm.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@contextmanager
def service_thread(name: str, bus_settings: Settings, build: Callable[[Bus], Any],
                   serve: Callable[[Any, Bus], None]) -> Iterator[Any]:
    """A service built on its own bus and served by a thread (serve(svc, bus)), stopped afterwards."""
    bus = AmqpBus(bus_settings, name, connect_timeout_s=5).connect()
    bus.declare(service_topology(bus_settings.prefix))
    svc = build(bus)
    t = threading.Thread(target=serve, args=(svc, bus), daemon=True)
    t.start()
    try:
        yield svc
    finally:
        svc.stop.set()
        t.join(10)
        bus.close()


@contextmanager
def aggregator_thread(bus_settings: Settings, grace_s: float, tick_s: float = 0.1,
                      service_settings: Settings | None = None) -> Iterator[Any]:
    """An AggregatorService on its own bus, served by a thread, stopped afterwards."""
    from sagmq.aggregator.main import AggregatorService

    def serve(svc: AggregatorService, bus: Bus) -> None:
        svc.start()
        bus.run(svc.stop, svc.tick, tick_s)

    with service_thread("aggregator", bus_settings,
                        lambda bus: AggregatorService(service_settings or bus_settings, bus, grace_s=grace_s),
                        serve) as svc:
        yield svc


# --- the chaos test's seeds (tests/faults/test_chaos.py) ---------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-seeds", default=None, metavar="N|S,S...",
        help="tests/faults/test_chaos.py: run seeds 0..N-1 (CI runs 3), or exactly the seeds of a comma "
             "list (`7,` runs seed 7 alone). The environment variable SAGMQ_CHAOS_SEEDS does the same.")


@pytest.fixture
def chaos_seed(request: pytest.FixtureRequest) -> int:
    """One seed of the chaos schedule; tests/faults/test_chaos.py parametrizes it (indirectly) from
    --chaos-seeds or SAGMQ_CHAOS_SEEDS."""
    return int(request.param)
