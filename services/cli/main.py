"""`sagmq`: run a service, talk to a running system, or run a whole POC locally."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from sagmq.cli.jobs import final_model_text, job_folder, wait_job, write_files
from sagmq.job.spec import parse_job, read_job_folder
from sagmq.wire.errors import (
    EXIT_BROKER,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_USAGE,
    BrokerUnavailable,
    ConfigError,
    JobSpecError,
    SagmqError,
    UsageError,
)
from sagmq.wire.messages import FINISHED
from sagmq.wire.settings import Settings, load_settings

SERVICES = ("server", "aggregator", "persistor", "client")


def broker_help(e: BrokerUnavailable) -> str:
    """What to tell a user whose broker does not answer: one line, the reason and the fix for its cause."""
    return f"error: {e}" + (f"; {e.hint}" if e.hint else "")


def _admin(settings: Settings) -> Any:
    from sagmq.cli.admin import CLI_CONNECT_S, AdminClient

    return AdminClient(settings, CLI_CONNECT_S, server_grace_s=5.0)  # no server: say so in 5 s, not after the RPC timeout


def cmd_submit(s: Settings, a: argparse.Namespace) -> int:
    """`sagmq submit`: check a job folder and submit it; print the job id."""
    files = read_job_folder(job_folder(a.job_dir))
    for w in parse_job(files).warnings:  # refuse invalid folders before they reach the broker; warn of no-ops
        print(f"warning: {w}", file=sys.stderr)
    admin = _admin(s)
    try:
        print(admin.submit(files))
    finally:
        admin.close()
    return 0


def cmd_list(s: Settings, a: argparse.Namespace) -> int:
    """`sagmq list`: a table of the server's jobs."""
    admin = _admin(s)
    try:
        jobs = admin.call("list").result["jobs"]
    finally:
        admin.close()
    if a.json:
        print(json.dumps(jobs, default=str))
        return 0
    print(f"{'JOB ID':34} {'NAME':24} {'STATUS':10} {'ROUND':5} SUBMITTED")
    for j in jobs:
        sub = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["submitted_at"]))
        rnd = "" if j["current_round"] is None else str(j["current_round"])
        print(f"{j['job_id']:34} {j['name'][:24]:24} {j['status']:10} {rnd:5} {sub}"
              + (f"  {j['reason']}" if j["reason"] else ""))
    return 0


def cmd_status(s: Settings, a: argparse.Namespace) -> int:
    """`sagmq status`: sites, the running job, the job queue and the queues; or one job (see sagmq.cli.status)."""
    from sagmq.cli.status import run_status

    return run_status(s, a.job_id, a.json)


def cmd_wait(s: Settings, a: argparse.Namespace) -> int:
    """`sagmq wait`: follow a job to its end; exit 0 only if it finished."""
    admin = _admin(s)
    try:
        st = wait_job(admin, a.job_id, a.timeout, as_json=a.json)
    finally:
        admin.close()
    if a.json:
        print(json.dumps({"event": "end", "job_id": st["job_id"], "status": st["status"], "reason": st["reason"]}))
    else:
        print(f"job {st['job_id']} {st['status']}" + (f": {st['reason']}" if st["reason"] else ""))
    return 0 if st["status"] == FINISHED else EXIT_FAILED


def cmd_abort(s: Settings, a: argparse.Namespace) -> int:
    """`sagmq abort`: stop a job."""
    admin = _admin(s)
    try:
        admin.call("abort", {"job_id": a.job_id})
    finally:
        admin.close()
    print(f"job {a.job_id} aborted")
    return 0


def cmd_download(s: Settings, a: argparse.Namespace) -> int:
    """`sagmq download`: write a job's files and print its final model."""
    admin = _admin(s)
    try:
        files = admin.download(a.job_id)
    finally:
        admin.close()
    write_files(Path(a.out), files)
    print(f"{len(files)} file(s) written to {a.out}")
    from sagmq.cli.plot import plot_beside_history

    print(plot_beside_history(Path(a.out)))
    final = final_model_text(Path(a.out))  # models/server.npy, or server.npz for several arrays
    if final:
        print(final)
    return 0


def cmd_shutdown(s: Settings, a: argparse.Namespace) -> int:
    """`sagmq shutdown`: stop the services, or one site."""
    if a.target == "client" and not a.name:
        raise SagmqError("shutdown client needs the site NAME")
    admin = _admin(s)
    try:
        r = admin.call("shutdown", {"target": a.target, "site": a.name or ""})
    finally:
        admin.close()
    print("stopping: " + ", ".join(r.result["stopping"]))
    return 0


def cmd_dead(s: Settings, a: argparse.Namespace) -> int:
    """`sagmq dead`: list, show or purge dead-lettered messages."""
    from sagmq.cli.dead import dead_list, dead_purge, dead_show

    if a.action == "purge":
        return dead_purge(s)
    if a.action == "show":
        if not a.id:
            raise SagmqError("dead show needs the message ID (see `sagmq dead list`)")
        return dead_show(s, a.id, a.limit)
    return dead_list(s, a.limit, as_json=a.json)


def cmd_watch(s: Settings, a: argparse.Namespace) -> int:
    """`sagmq watch`: see sagmq.cli.watch."""
    from sagmq.cli.watch import run_watch

    return run_watch(s, a.job, a.interval, a.lines)


def cmd_plot(s: Settings, a: argparse.Namespace) -> int:
    """`sagmq plot JOB --out FILE.png`: see sagmq.cli.plot."""
    from sagmq.cli.plot import run_plot

    return run_plot(s, a.job_id, Path(a.out))


def cmd_bench_plot(s: Settings, a: argparse.Namespace) -> int:
    """`sagmq bench-plot FILE... --out FILE.png`: see sagmq.cli.benchplot."""
    from sagmq.cli.benchplot import run_bench_plot

    return run_bench_plot(a.files, a.out)


def cmd_teardown(s: Settings, a: argparse.Namespace) -> int:
    """`sagmq teardown`: see sagmq.cli.teardown."""
    from sagmq.cli.teardown import run_teardown

    return run_teardown(s, a.force)


def cmd_bench(s: Settings, a: argparse.Namespace) -> int:
    """`sagmq bench`: see sagmq.cli.bench."""
    from sagmq.cli.bench import run_bench

    return run_bench(s, a)


def cmd_poc(s: Settings, a: argparse.Namespace) -> int:
    """`sagmq poc`: see sagmq.cli.poc."""
    from sagmq.cli.poc import run_poc

    return run_poc(s, a)


def cmd_provision(s: Settings, a: argparse.Namespace) -> int:
    """`sagmq provision`: write broker definitions and per-user env files."""
    from sagmq.cli.provision import write_provision

    sites = [x.strip() for x in a.sites.split(",") if x.strip()]
    names = [x.strip() for x in (a.broker_names or "").split(",") if x.strip()]
    write_provision(Path(a.out), sites, a.prefix, a.vhost, a.host, a.port, a.tls, force=a.force,
                    tls_dir=a.tls_dir if a.tls else "", broker_names=names)
    print(f"wrote {a.out}/definitions.json, {len(sites)} site env file(s) in {a.out}/sites and 4 in "
          f"{a.out}/services (mode 0600: they hold passwords)\n"
          f"load it with: rabbitmqctl import_definitions {a.out}/definitions.json")
    if a.tls:
        print(f"TLS: {a.out}/tls holds the CA, the broker's certificate ({', '.join([a.host, *names])}), one "
              f"per user and rabbitmq.conf; the env files expect ca.pem, USER.pem and USER.key at {a.tls_dir}")
    return 0


def cmd_health(s: Settings, a: argparse.Namespace) -> int:
    """`sagmq health [SERVICE]`: 0 if the service's loop turns and its bus is connected (sagmq.runtime.health)."""
    from sagmq.runtime.health import check_health

    code, lines = check_health(s, a.service or "")
    for line in lines:
        print(line, file=sys.stdout if code == 0 else sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    """The `sagmq` command line: one subcommand per service and per admin command."""
    p = argparse.ArgumentParser(prog="sagmq", description="Scatter-and-Gather federated learning over RabbitMQ.")
    p.add_argument("--version", action="version", version=f"sagmq {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SERVICES:
        sub.add_parser(name, help=f"run the {name} service", add_help=False)
    sub.add_parser("supervise", help="run a service, restarting it when it crashes: supervise SERVICE [ARGS]",
                   add_help=False)
    sp = sub.add_parser("health", help="exit 0 if a service's loop runs and its broker connection is up")
    sp.add_argument("service", nargs="?", help="server, aggregator, persistor, client (default: every health file)")
    sp = sub.add_parser("submit", help="submit an NVFlare job folder; prints the job id")
    sp.add_argument("job_dir")
    sp = sub.add_parser("list", help="list jobs")
    sp.add_argument("--json", action="store_true", help="one JSON array")
    sp = sub.add_parser("status", help="sites, the running job, the job queue and every queue; or one job")
    sp.add_argument("job_id", nargs="?")
    sp.add_argument("--json", action="store_true", help="the same as one JSON object")
    sp = sub.add_parser("wait", help="wait for a job to end, showing each round")
    sp.add_argument("job_id")
    sp.add_argument("--timeout", type=float, help="seconds to wait at most")
    sp.add_argument("--json", action="store_true", help="one JSON line per event")
    sp = sub.add_parser("watch", help="a live view of sites, rounds and queues, refreshed every second")
    sp.add_argument("--job", help="follow this job and exit when it ends (exit code as `wait`)")
    sp.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    sp.add_argument("--lines", action="store_true", help="line output even on a terminal")
    sp = sub.add_parser("plot", help="draw a job's rounds (seconds, sites, metrics) to a PNG")
    sp.add_argument("job_id")
    sp.add_argument("--out", required=True, help="the PNG file to write")
    sp = sub.add_parser("bench-plot", help="draw seconds per round against sites, beside the floor, from "
                        "`sagmq bench --json` output")
    sp.add_argument("files", nargs="+", help="files of `sagmq bench --json` lines")
    sp.add_argument("--out", required=True, help="the PNG file to write")
    sp = sub.add_parser("teardown", help="delete the prefix's exchanges and queues (refused while a job runs)")
    sp.add_argument("--force", action="store_true", help="even while a job runs")
    sp = sub.add_parser("abort", help="abort a queued or running job")
    sp.add_argument("job_id")
    sp = sub.add_parser("download", help="download a job's models and history")
    sp.add_argument("job_id")
    sp.add_argument("--out", required=True, help="folder to write into")
    sp = sub.add_parser("shutdown", help="stop services: all, server, or client NAME")
    sp.add_argument("target", choices=["all", "server", "client"])
    sp.add_argument("name", nargs="?")
    from sagmq.cli.bench import add_parser as add_bench

    add_bench(sub)
    sp = sub.add_parser("dead", help="list dead-lettered messages and why, show one, or purge them all")
    sp.add_argument("action", choices=["list", "show", "purge"])
    sp.add_argument("id", nargs="?", help="message id (for show)")
    sp.add_argument("--limit", type=int, default=1000, help="read at most this many messages")
    sp.add_argument("--json", action="store_true", help="dead list: one JSON object")
    sp = sub.add_parser("poc", help="run server, aggregator, persistor and N clients locally and run a job")
    sp.add_argument("job_dir", nargs="?", help="job folder (default: jobs/hello-numpy-sag)")
    sp.add_argument("--clients", type=int, default=2, help="number of sites (site-1 ... site-N)")
    sp.add_argument("--workspace", help="folder for the services' state and logs (default: a new temp folder)")
    sp.add_argument("--out", help="folder to download the results to (default: WORKSPACE/out)")
    sp.add_argument("--allow-custom-code", action="store_true", help="let the sites run the job's custom code")
    sp.add_argument("--timeout", type=float, default=600, help="seconds the job may take")
    sp = sub.add_parser("provision", help="write broker definitions (users, least-privilege permissions) and env files")
    sp.add_argument("--sites", required=True, help="comma-separated site names, e.g. site-1,site-2")
    sp.add_argument("--out", required=True, help="folder to write into (must be empty unless --force)")
    sp.add_argument("--prefix", default="sag", help="name prefix of exchanges and queues (default: sag)")
    sp.add_argument("--vhost", default="sagmq", help="virtual host (default: sagmq)")
    sp.add_argument("--host", default="localhost", help="broker host in the URLs (default: localhost)")
    sp.add_argument("--port", type=int, help="broker port in the URLs (default: 5672, or 5671 with --tls)")
    sp.add_argument("--tls", action="store_true", help="amqps:// URLs, and OUT/tls: a CA, the broker's and each "
                    "user's certificate, a rabbitmq.conf snippet; env files point at them under --tls-dir")
    sp.add_argument("--tls-dir", default="/etc/sagmq/tls", help="where a container finds ca.pem, USER.pem and "
                    "USER.key (default: /etc/sagmq/tls)")
    sp.add_argument("--broker-names", help="comma-separated extra names (or IPs) of the broker for its "
                    "certificate, besides --host")
    sp.add_argument("--force", action="store_true", help="overwrite the files of a non-empty --out folder")
    return p


COMMANDS = {"submit": cmd_submit, "list": cmd_list, "status": cmd_status, "wait": cmd_wait, "abort": cmd_abort,
            "download": cmd_download, "shutdown": cmd_shutdown, "poc": cmd_poc, "dead": cmd_dead, "bench": cmd_bench,
            "provision": cmd_provision, "health": cmd_health}
COMMANDS.update({"watch": cmd_watch, "plot": cmd_plot, "bench-plot": cmd_bench_plot, "teardown": cmd_teardown})


def _version() -> str:
    """The installed package's version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sagmq")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _log_to_stderr() -> None:
    """The CLI's own warnings (a retry, an unknown variable) as `warning: ...` lines on stderr."""
    import logging

    class Lower(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return f"{record.levelname.lower()}: {record.getMessage()}"

    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(Lower())
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
        logging.getLogger("pika").setLevel(logging.CRITICAL)  # its connect errors are ours, said once, better


def main(argv: list[str] | None = None) -> int:
    """Entry point of `sagmq`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "supervise":
        from sagmq.runtime.supervise import run_supervise

        return run_supervise(argv[1:])
    if argv and argv[0] in SERVICES:
        return run_service(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    _log_to_stderr()
    try:
        settings = load_settings()
        return COMMANDS[args.command](settings, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokerUnavailable as e:
        print(broker_help(e), file=sys.stderr)
        return EXIT_BROKER
    except JobSpecError as e:
        where = e.file if e.field == "-" else f"{e.file}: {e.field}"
        print(f"error: invalid job: {where}: {e.problem}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SagmqError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED


def run_service(name: str, argv: list[str]) -> int:
    """Start one service in this process."""
    import importlib

    module = importlib.import_module(f"sagmq.{name}.main")
    try:
        return int(module.main(argv))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokerUnavailable as e:
        print(broker_help(e), file=sys.stderr)
        return EXIT_BROKER


if __name__ == "__main__":
    sys.exit(main())
