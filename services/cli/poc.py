"""`sagmq poc`: every service as a local process, one job, results downloaded, all stopped."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from sagmq.cli.admin import AdminClient
from sagmq.cli.jobs import wait_job, write_files
from sagmq.cli.procs import LocalStack
from sagmq.job.examples import example_job
from sagmq.job.spec import parse_job, read_job_folder
from sagmq.wire.bus import Bus
from sagmq.wire.errors import EXIT_FAILED, SagmqError
from sagmq.wire.messages import FINISHED
from sagmq.wire.settings import Settings
from sagmq.wire.topology import service_topology, site_topology


def default_job() -> Path:
    """jobs/hello-numpy-sag of the current folder, else the copy installed with sagmq."""
    local = Path("jobs/hello-numpy-sag")
    if local.is_dir():
        return local
    return example_job("hello-numpy-sag")


def run_poc(s: Settings, a: argparse.Namespace) -> int:
    """Start the services, run the job, download, stop; exit 0 only if the job finished."""
    if a.clients < 1:
        raise SagmqError("--clients must be at least 1")
    job_dir = Path(a.job_dir) if a.job_dir else default_job()
    files = read_job_folder(job_dir)
    spec = parse_job(files)
    # A private prefix unless one was chosen: a POC never mixes with other deployments' queues.
    own_prefix = not os.environ.get("SAGMQ_PREFIX")
    prefix = f"poc-{uuid.uuid4().hex[:8]}" if own_prefix else s.prefix
    s = Settings(**{**{f: getattr(s, f) for f in Settings.__dataclass_fields__}, "prefix": prefix})
    workspace = Path(a.workspace) if a.workspace else Path(tempfile.mkdtemp(prefix="sagmq-poc-"))
    out = Path(a.out) if a.out else workspace / "out"
    admin = AdminClient(s)  # fails fast, with advice, when no broker answers
    sites = [f"site-{i}" for i in range(1, a.clients + 1)]
    stack = LocalStack({"SAGMQ_PREFIX": prefix, "SAGMQ_WORKSPACE": str(workspace)}, workspace / "logs")
    print(f"poc: workspace {workspace}, prefix {prefix}, job {spec.name}, sites {', '.join(sites)}", flush=True)
    try:
        for name in ("persistor", "aggregator", "server"):
            stack.start(name, name)
        extra = ["--allow-custom-code"] if a.allow_custom_code else []
        for site in sites:
            stack.start(site, "client", "--site", site, *extra)
        _wait_for_sites(admin, stack, sites)
        job_id = admin.submit(files)
        print(f"poc: submitted job {job_id}", flush=True)
        st = wait_job(admin, job_id, a.timeout)
        print(f"poc: job {job_id} {st['status']}" + (f": {st['reason']}" if st["reason"] else ""), flush=True)
        write_files(out, admin.download(job_id))
        model = out / "models" / "server.npy"
        if model.exists():
            print(f"poc: final model ({model}):\n{np.load(model)}", flush=True)
        print(f"poc: results in {out}; logs in {workspace / 'logs'}", flush=True)
        return 0 if st["status"] == FINISHED else EXIT_FAILED
    except SagmqError:
        for p in stack.procs:
            if p.popen.poll() is not None:
                print(f"poc: {p.name} exited with {p.popen.returncode}; its log ends:\n{p.tail()}", file=sys.stderr)
        raise
    finally:
        stack.stop_all()
        if own_prefix:
            _cleanup(admin.bus, prefix, sites)
        admin.close()


def _wait_for_sites(admin: AdminClient, stack: LocalStack, sites: list[str], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dead = stack.dead()
        if dead:
            raise SagmqError(f"{dead[0].name} exited with {dead[0].popen.returncode}:\n{dead[0].tail()}")
        try:
            alive = {x["site"] for x in admin.status()["sites"] if x["alive"]}
        except SagmqError:
            alive = set()  # the server is still starting
        if set(sites) <= alive:
            return
        time.sleep(0.1)
    raise SagmqError(f"sites did not connect within {timeout_s:g} s")


def _cleanup(bus: Bus, prefix: str, sites: list[str]) -> None:
    try:
        for site in sites:
            bus.delete(site_topology(prefix, site))
        bus.delete(service_topology(prefix))
    except Exception as e:  # cleanup is best effort; the job's outcome is what matters
        print(f"poc: could not delete the queues of prefix {prefix}: {e}", file=sys.stderr)
