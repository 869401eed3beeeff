"""`sagmq bench`: the real services as local processes, one job, per-round seconds against the
broker floor measured in the same run, peak memory of every service, and a correctness check."""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from sagmq.cli.admin import AdminClient
from sagmq.cli.floor import measure_floor, median
from sagmq.cli.procs import LocalStack, Proc, group_spec, site_groups
from sagmq.job.spec import read_job_folder
from sagmq.wire.errors import SagmqError
from sagmq.wire.settings import Settings
from sagmq.wire.topology import service_topology, site_topology

NV = "nvflare.app_common"


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_mb(pid: int) -> float:
    """VmRSS (resident set now) of a live process, in MB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a live process has used."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def broker_pids() -> list[int]:
    """The local RabbitMQ node's Erlang VM (run by the rabbitmq user), if it runs on this machine."""
    try:
        uid = pwd.getpwnam("rabbitmq").pw_uid
    except KeyError:
        return []
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if (d / "comm").read_text().strip() == "beam.smp" and d.stat().st_uid == uid:
                out.append(int(d.name))
        except OSError:
            continue
    return out


def _broker_cpu() -> float:
    return sum(cpu_s(p) for p in broker_pids())


def write_job(root: Path, clients: int, rounds: int, ckpt: Path) -> Path:
    """hello-numpy-sag with N sites, R rounds, and the bench model as the persistor's checkpoint."""
    app = root / "app" / "config"
    app.mkdir(parents=True)
    (root / "meta.json").write_text(json.dumps(
        {"name": "bench", "resource_spec": {}, "min_clients": clients, "deploy_map": {"app": ["@ALL"]}}))
    server = {
        "format_version": 2,
        "components": [
            {"id": "persistor", "path": f"{NV}.np.np_model_persistor.NPModelPersistor",
             "args": {"source_ckpt_file_full_name": str(ckpt)}},
            {"id": "shareable_generator",
             "path": f"{NV}.shareablegenerators.full_model_shareable_generator.FullModelShareableGenerator",
             "args": {}},
            {"id": "aggregator",
             "path": f"{NV}.aggregators.intime_accumulate_model_aggregator.InTimeAccumulateWeightedAggregator",
             "args": {"expected_data_kind": "WEIGHTS"}},
        ],
        "workflows": [{"id": "sag", "path": f"{NV}.workflows.scatter_and_gather.ScatterAndGather", "args": {
            "min_clients": clients, "num_rounds": rounds, "wait_time_after_min_received": 600,
            "persistor_id": "persistor", "train_timeout": 0}}],
    }
    (app / "config_fed_server.json").write_text(json.dumps(server))
    (app / "config_fed_client.json").write_text(json.dumps({"format_version": 2, "executors": [
        {"tasks": ["train"], "executor": {"path": f"{NV}.np.np_trainer.NPTrainer", "args": {}}}]}))
    return root


def heartbeat_s(clients: int) -> float:
    """The sites' heartbeat period: 2 s, longer past 200 sites so that the server gets at most about
    100 heartbeats a second (1000 sites: every 10 s), well inside the bench's 120 s client timeout."""
    return max(2.0, clients / 100)


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": median(xs), "min": min(xs) if xs else float("nan"), "max": max(xs) if xs else float("nan"),
            "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def _say_to(quiet: bool) -> Callable[[str], None]:
    """The progress printer: silent when the report is JSON (stdout holds only that)."""
    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)
    return say


def _check_args(a: argparse.Namespace) -> np.dtype[Any]:
    """The model's dtype, once the sizes and the dtype are known to make sense."""
    if a.clients < 1 or a.floats < 1 or a.rounds < 1:
        raise SagmqError("--clients, --floats and --rounds must be at least 1")
    dtype = np.dtype(str(a.dtype))
    if dtype.kind != "f":
        raise SagmqError("--dtype must be a float type (float16, float32, float64)")
    return dtype


def _floor(s: Settings, a: argparse.Namespace, nbytes: int,
           say: Callable[[str], None]) -> tuple[list[float], dict[str, float]]:
    """The broker floor's seconds per round and CPU ms per round (both empty with --skip-floor)."""
    if a.skip_floor:
        return [], {}
    say("bench: measuring the broker floor ...")
    b0 = _broker_cpu()
    used_floor: dict[str, float] = {}
    floor = measure_floor(s, s.prefix, a.clients, nbytes, a.rounds, used_floor)
    # (the broker's figure also holds the floor's queue setup and teardown: a little high)
    floor_cpu = {k: 1000 * v / a.rounds for k, v in used_floor.items()}
    floor_cpu["broker"] = 1000 * (_broker_cpu() - b0) / a.rounds
    floor_cpu["total"] = sum(floor_cpu.values())
    say(f"bench: floor median {median(floor):.4f} s/round")
    return floor, floor_cpu


@dataclass
class _Run:
    """What one bench job measured."""

    rounds: list[float]  # seconds of each finished round
    rss: dict[str, float]  # peak MB per process
    site_procs: list[str]  # the names of the processes that run the sites
    used: dict[str, float]  # CPU seconds per process (and the broker) during the job
    status_s: list[float]  # how long each status request took
    correct: bool  # the final model is the expected one


def _wait_sites(stack: LocalStack, admin: AdminClient, clients: int, say: Callable[[str], None]) -> None:
    """Wait until the server sees every site alive; raise if a process dies or time runs out."""
    t0 = time.monotonic()
    while True:
        dead = stack.dead()
        if dead:
            raise SagmqError(f"{dead[0].name} exited:\n{dead[0].tail()}")
        try:
            alive = sum(1 for x in admin.status()["sites"] if x["alive"])
        except SagmqError:
            alive = 0
        if alive == clients:
            break
        if time.monotonic() - t0 > 60 + clients:
            raise SagmqError(f"only {alive} of {clients} sites connected")
        time.sleep(0.2)
    say(f"bench: {clients} sites up in {time.monotonic() - t0:.1f} s; running the job ...")


def _follow(admin: AdminClient, job_id: str, say: Callable[[str], None]) -> tuple[dict[str, Any], list[float]]:
    """Poll the job until it ends, printing each round; its final status, and the status answer times."""
    shown = 0
    status_s: list[float] = []  # how long the server takes to answer, while rounds are in flight
    while True:
        asked = time.monotonic()
        try:
            st = admin.status(job_id, history_from=shown)  # only the records not shown yet
        except SagmqError as e:  # the server can be busy for a while moving a very large model
            say(f"bench: status not answered yet ({e})")
            status_s.append(time.monotonic() - asked)
            continue
        status_s.append(time.monotonic() - asked)
        for h in st["history"]:
            if "done_at" not in h:
                break
            say(f"bench: round {h['round']} {h['done_at'] - h['started_at']:.3f} s")
            shown += 1
        if st["status"] in ("finished", "failed", "aborted"):
            return admin.status(job_id), status_s  # every record
        time.sleep(0.1)


def expected_model(base: np.ndarray, clients: int, rounds: int) -> np.ndarray:
    """The final model, bit for bit, as NVFlare's arithmetic gives it: each round every site adds
    NPTrainer's delta (1, in the model's dtype), the aggregator sums the N identical contributions
    one by one in the model's float dtype and multiplies the sum by 1.0 / N. For N a power of two
    that is base + rounds exactly; for others the float rounding of 1.0 / N shows (at 1000 sites
    a float32 weight of 6.0 comes out as 6.0000005)."""
    model = base
    dt = base.dtype.type
    for _ in range(rounds):
        v = model + dt(1.0)
        acc = np.zeros_like(v)
        for _ in range(clients):
            acc += v
        acc *= dt(1.0 / clients)
        model = acc
    return model


def _final_is_right(work: Path, job_id: str, a: argparse.Namespace, dtype: np.dtype[Any]) -> bool:
    """The saved model is the one expected_model() gives, in the right dtype and shape."""
    final = np.load(work / "ws" / "persistor" / "jobs" / job_id / "models" / "server.npy", mmap_mode="r")
    base = (np.arange(a.floats) % 1000).astype(dtype)
    return bool(final.dtype == dtype and final.shape == (a.floats,)
                and np.array_equal(final, expected_model(base, a.clients, a.rounds)))


def _cleanup(admin: AdminClient, prefix: str, sites: list[str]) -> None:
    """Delete the run's queues and exchanges (best effort)."""
    try:
        for site in sites:
            admin.bus.delete(site_topology(prefix, site))
        admin.bus.delete(service_topology(prefix))
    except Exception as e:  # cleanup is best effort
        print(f"bench: cleanup of prefix {prefix} failed: {e}", file=sys.stderr)


def _run_job(s: Settings, a: argparse.Namespace, work: Path, nbytes: int, dtype: np.dtype[Any],
             say: Callable[[str], None]) -> _Run:
    """Start the services and the sites, run the bench job, measure it, and stop everything."""
    job = write_job(work / "job", a.clients, a.rounds, work / "initial.npy")
    sites = [f"site-{i}" for i in range(1, a.clients + 1)]
    env = {"SAGMQ_PREFIX": s.prefix, "SAGMQ_WORKSPACE": str(work / "ws"), "SAGMQ_CHUNK_BYTES": str(s.chunk_bytes),
           "SAGMQ_LOG_LEVEL": "INFO" if a.keep else "WARNING", "SAGMQ_HEARTBEAT_S": str(heartbeat_s(a.clients)), "SAGMQ_CLIENT_TIMEOUT_S": "120",
           "SAGMQ_MAX_MODEL_BYTES": str(max(s.max_model_bytes, 2 * nbytes + 2**20))}
    stack = LocalStack(env, work / "logs")
    admin = AdminClient(s)
    procs: dict[str, Proc] = {}
    try:
        for name in ("persistor", "aggregator", "server"):
            procs[name] = stack.start(name, name)
        for k, group in enumerate(site_groups(sites)):  # one process each, or a few with many sites each
            if len(group) == 1:
                procs[group[0]] = stack.start(group[0], "client", "--site", group[0])
            else:
                procs[f"sites-{k + 1}"] = stack.start(f"sites-{k + 1}", "client", "--sites", group_spec(group))
        _wait_sites(stack, admin, a.clients, say)
        cpu0 = {name: cpu_s(p.popen.pid) for name, p in procs.items()}
        cpu0["broker"] = _broker_cpu()
        job_id = admin.submit(read_job_folder(job))
        st, status_s = _follow(admin, job_id, say)
        rss = {name: round(peak_rss_mb(p.popen.pid), 1) for name, p in procs.items()}
        used = {name: cpu_s(p.popen.pid) - cpu0[name] for name, p in procs.items()}
        used["broker"] = _broker_cpu() - cpu0["broker"]
        if st["status"] != "finished":
            raise SagmqError(f"job {st['status']}: {st['reason']}")
        rounds = [h["done_at"] - h["started_at"] for h in st["history"] if "done_at" in h]
        correct = _final_is_right(work, job_id, a, dtype)
    finally:
        stack.stop_all()
        _cleanup(admin, s.prefix, sites)
        admin.close()
    site_procs = [name for name in procs if name not in ("persistor", "aggregator", "server")]
    return _Run(rounds, rss, site_procs, used, status_s, correct)


def _report(s: Settings, a: argparse.Namespace, dtype: np.dtype[Any], nbytes: int, run: _Run,
            floor: list[float], floor_cpu: dict[str, float]) -> dict[str, Any]:
    """The bench's figures, as printed with --json."""
    rss, used, rounds, status_s = run.rss, run.used, run.rounds, run.status_s
    client_rss = [rss[k] for k in run.site_procs]
    # CPU milliseconds per round, over the whole job (the last round's save included)
    cpu = {k: 1000 * used[k] / a.rounds for k in ("server", "aggregator", "persistor", "broker")}
    cpu["sites"] = 1000 * sum(used[k] for k in run.site_procs) / a.rounds
    cpu["total"] = sum(cpu.values())
    return {
        "clients": a.clients, "floats": a.floats, "dtype": dtype.name, "model_mb": round(nbytes / 1e6, 3),
        "rounds": a.rounds, "chunk_mib": s.chunk_bytes / 2**20,
        "round_s": rounds, "round_s_median": median(rounds), "round_s_spread": _stats(rounds),
        "floor_round_s": floor, "floor_round_s_median": median(floor) if floor else None,
        "ratio": (median(rounds) / median(floor)) if floor else None,
        "peak_rss_mb": {"server": rss["server"], "aggregator": rss["aggregator"], "persistor": rss["persistor"],
                        "client_max": max(client_rss), "client_median": statistics.median(client_rss)},
        "services_total_mb": round(rss["server"] + rss["aggregator"] + rss["persistor"], 1),
        "site_processes": len(run.site_procs),
        "all_processes_mb": round(sum(rss.values()), 1),  # every sagmq process's peak, added up (not the broker)
        "broker_rss_mb": round(sum(rss_mb(p) for p in broker_pids()), 1),  # the broker's resident memory at the end
        "status_s": {"median": round(median(status_s), 4), "max": round(max(status_s), 4), "count": len(status_s)},
        "cpu_ms_per_round": {k: round(v, 2) for k, v in cpu.items()},
        "floor_cpu_ms_per_round": {k: round(v, 2) for k, v in floor_cpu.items()} or None,
        "cores": os.cpu_count(),
        "correct": run.correct,
    }


def _print_report(report: dict[str, Any], floor: list[float], floor_cpu: dict[str, float]) -> None:
    """The report for a reader."""
    sp = report["round_s_spread"]
    print(f"round seconds: median {sp['median']:.4f} (min {sp['min']:.4f}, max {sp['max']:.4f})")
    if floor:
        print(f"broker floor:  median {median(floor):.4f} s/round; ratio {report['ratio']:.2f}")
    r = report["peak_rss_mb"]
    print(f"peak RSS MB: server {r['server']}, aggregator {r['aggregator']}, persistor {r['persistor']}, "
          f"site process max {r['client_max']} (model {report['model_mb']} MB); all {report['site_processes']} "
          f"site processes and the services together {report['all_processes_mb']}")
    st_s = report["status_s"]
    print(f"admin status answered in median {st_s['median']:.4f} s, max {st_s['max']:.4f} s "
          f"({st_s['count']} requests during the job)")
    c = report["cpu_ms_per_round"]
    print(f"CPU ms per round: total {c['total']:.2f} (server {c['server']:.2f}, aggregator {c['aggregator']:.2f}, "
          f"persistor {c['persistor']:.2f}, sites {c['sites']:.2f}, broker {c['broker']:.2f}) on "
          f"{report['cores']} cores" + (f"; the floor's: {floor_cpu['total']:.2f}" if floor_cpu else ""))
    print(f"final model correct: {report['correct']}")


def run_bench(s: Settings, a: argparse.Namespace) -> int:
    """Measure the floor, run the job, report; exit 0 only if the final model is right."""
    dtype = _check_args(a)
    s = replace(s, chunk_bytes=int(a.chunk_mb * 2**20)) if a.chunk_mb else s
    s = replace(s, prefix=f"bench-{uuid.uuid4().hex[:8]}")
    work = Path(a.workspace) if a.workspace else Path(tempfile.mkdtemp(prefix="sagmq-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    nbytes = a.floats * dtype.itemsize
    say = _say_to(a.json)
    say(f"bench: {a.clients} clients x {a.floats} {dtype.name} ({nbytes / 1e6:.1f} MB), {a.rounds} rounds, "
        f"chunk {s.chunk_bytes / 2**20:g} MiB, workspace {work}")
    floor, floor_cpu = _floor(s, a, nbytes, say)
    base = (np.arange(a.floats) % 1000).astype(dtype)
    np.save(work / "initial.npy", base)
    del base
    run = _run_job(s, a, work, nbytes, dtype, say)
    report = _report(s, a, dtype, nbytes, run, floor, floor_cpu)
    if a.json:
        print(json.dumps(report))
    else:
        _print_report(report, floor, floor_cpu)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if run.correct else 1


def add_parser(sub: Any) -> None:
    """The `bench` subcommand's arguments."""
    sp = sub.add_parser("bench", help="benchmark: per-round seconds vs the broker floor, peak memory")
    sp.add_argument("--clients", type=int, default=2)
    sp.add_argument("--floats", type=int, default=9, help="model size in floats")
    sp.add_argument("--rounds", type=int, default=5)
    sp.add_argument("--dtype", default="float32")
    sp.add_argument("--chunk-mb", type=float, help="part size in MiB (default: SAGMQ_CHUNK_BYTES, 16 MiB)")
    sp.add_argument("--workspace", help="folder for the run (default: a temp folder, removed afterwards)")
    sp.add_argument("--keep", action="store_true", help="keep the workspace and logs")
    sp.add_argument("--skip-floor", action="store_true", help="do not measure the broker floor")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
