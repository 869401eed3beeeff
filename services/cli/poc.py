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

from sagmq.cli.admin import CLI_CONNECT_S, AdminClient
from sagmq.cli.jobs import job_folder, wait_job, write_files
from sagmq.cli.plot import plot_beside_history
from sagmq.cli.procs import LocalStack, group_spec, site_groups
from sagmq.cli.status import size
from sagmq.job.examples import example_job
from sagmq.job.spec import JobSpec, parse_job, read_job_folder
from sagmq.wire.bus import Bus
from sagmq.wire.errors import EXIT_FAILED, SagmqError, UsageError
from sagmq.wire.messages import FINISHED
from sagmq.wire.settings import Settings
from sagmq.wire.topology import service_topology, site_topology

BIG_BYTES = 4 * 2**20  # models over this get their sizes told


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
    job_dir = job_folder(a.job_dir) if a.job_dir else default_job()
    files = read_job_folder(job_dir)
    spec = parse_job(files)
    check_sites_enough(spec, a.clients)
    # A private prefix unless one was chosen: a POC never mixes with other deployments' queues.
    own_prefix = not os.environ.get("SAGMQ_PREFIX")
    prefix = f"poc-{uuid.uuid4().hex[:8]}" if own_prefix else s.prefix
    s = Settings(**{**{f: getattr(s, f) for f in Settings.__dataclass_fields__}, "prefix": prefix})
    workspace = Path(a.workspace) if a.workspace else Path(tempfile.mkdtemp(prefix="sagmq-poc-"))
    out = Path(a.out) if a.out else workspace / "out"
    admin = AdminClient(s, CLI_CONNECT_S)  # fails fast, with advice, when no broker answers
    sites = [f"site-{i}" for i in range(1, a.clients + 1)]
    stack = LocalStack({"SAGMQ_PREFIX": prefix, "SAGMQ_WORKSPACE": str(workspace)}, workspace / "logs")
    print(f"poc: workspace {workspace}, prefix {prefix}, job {spec.name}, sites {group_spec(sites)}", flush=True)
    try:
        for name in ("persistor", "aggregator", "server"):
            stack.start(name, name)
        extra = ["--allow-custom-code"] if a.allow_custom_code else []
        for k, group in enumerate(site_groups(sites)):  # one process each, or a few with many sites each
            if len(group) == 1:
                stack.start(group[0], "client", "--site", group[0], *extra)
            else:
                stack.start(f"sites-{k + 1}", "client", "--sites", group_spec(group), *extra)
        _wait_for_sites(admin, stack, sites)
        job_id = admin.submit(files)
        print(f"poc: submitted job {job_id}", flush=True)
        st = wait_job(admin, job_id, a.timeout)
        print(f"poc: job {job_id} {st['status']}" + (f": {st['reason']}" if st["reason"] else ""), flush=True)
        files_out = admin.download(job_id)
        write_files(out, files_out)
        total = sum(len(v) for v in files_out.values())
        if total >= BIG_BYTES:
            print(f"poc: downloaded {len(files_out)} file(s), {size(total)}", flush=True)
        print(f"poc: {plot_beside_history(out)}", flush=True)
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


def check_sites_enough(spec: JobSpec, clients: int) -> None:
    """Refuse at once a job that could never start with the sites a POC starts (site-1 ... site-N)."""
    need = max(spec.min_clients, min(spec.sag.min_clients, 1000))
    usable = [f"site-{i}" for i in range(1, clients + 1) if spec.site_allowed(f"site-{i}")]
    if len(usable) < need:
        which = "meta.json min_clients" if spec.min_clients >= need else "ScatterAndGather min_clients"
        raise UsageError(f"job {spec.name} needs {need} site(s) ({which}={need}) but --clients {clients} gives it "
                         f"{len(usable)}: run `sagmq poc --clients {max(need, clients + need - len(usable))}`")


def _wait_for_sites(admin: AdminClient, stack: LocalStack, sites: list[str], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s + len(sites) / 20  # (1000 sites take a while to declare)
    told = -1
    while time.monotonic() < deadline:
        dead = stack.dead()
        if dead:
            raise SagmqError(f"{dead[0].name} exited with {dead[0].popen.returncode}:\n{dead[0].tail()}")
        try:
            alive = {x["site"] for x in admin.status()["sites"] if x["alive"]}
        except SagmqError:
            alive = set()  # the server is still starting
        connected = len(set(sites) & alive)
        if connected != told:
            print(f"poc: waiting for sites: {connected} of {len(sites)} connected", flush=True)
            told = connected
        if set(sites) <= alive:
            return
        time.sleep(0.1)
    raise SagmqError(f"sites did not connect within {timeout_s:g} s: {told} of {len(sites)} connected "
                     f"(their logs are in the workspace's logs folder)")


def _cleanup(bus: Bus, prefix: str, sites: list[str]) -> None:
    try:
        for site in sites:
            bus.delete(site_topology(prefix, site))
        bus.delete(service_topology(prefix))
    except Exception as e:  # cleanup is best effort; the job's outcome is what matters
        print(f"poc: could not delete the queues of prefix {prefix}: {e}", file=sys.stderr)
