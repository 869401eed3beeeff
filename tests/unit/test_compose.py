"""Static checks of the compose stack: docker-compose.yml and deploy/rabbitmq/.

No broker and no Docker engine are needed. PyYAML parses the compose file;
the last test also runs `docker-compose config -q`, which only needs the
docker-compose binary (CI installs Debian's package).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
RABBITMQ_CONF = ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf"
ENABLED_PLUGINS = ROOT / "deploy" / "rabbitmq" / "enabled_plugins"

# The sagmq services that `docker compose up` starts, keyed by the
# subcommand each one must run.
SAGMQ_SERVICES = ("server", "aggregator", "persistor", "client")
# 128 MiB: the largest max_message_size the services are designed for.
MAX_MESSAGE_SIZE_LIMIT = 134217728


@pytest.fixture(scope="module")
def compose() -> dict:
    try:
        import yaml
    except ImportError:  # pragma: no cover - depends on the environment
        pytest.fail(
            "PyYAML is required for tests/unit/test_compose.py: "
            "`pip install pyyaml` (it belongs in the test extras)"
        )
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    svcs = compose.get("services")
    assert isinstance(svcs, dict) and svcs, "docker-compose.yml has no services"
    return svcs


def _command(service: dict) -> list[str]:
    cmd = service.get("command")
    if cmd is None:
        return []
    if isinstance(cmd, str):
        return shlex.split(cmd)
    return [str(part) for part in cmd]


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        out = {}
        for item in env:
            key, _, value = str(item).partition("=")
            out[key] = value
        return out
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _sagmq_service_names(services: dict) -> list[str]:
    """Every service built from deploy/Dockerfile (i.e. runs sagmq code)."""
    names = []
    for name, svc in services.items():
        build = svc.get("build")
        if isinstance(build, str):
            built_here = True
        elif isinstance(build, dict):
            built_here = str(build.get("dockerfile", "")).endswith("deploy/Dockerfile")
        else:
            built_here = False
        if built_here or _command(svc)[:1] == ["sagmq"]:
            names.append(name)
    return names


def _read_conf(path: Path) -> dict[str, str]:
    """Parse RabbitMQ's sysctl-style `key = value` format (comments with #)."""
    entries: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: malformed line {raw!r}"
        entries[key.strip()] = value.strip()
    return entries


def test_required_services_present(services: dict) -> None:
    missing = {"rabbitmq", *SAGMQ_SERVICES} - set(services)
    assert not missing, f"services missing from docker-compose.yml: {sorted(missing)}"


def test_client_is_scalable(services: dict) -> None:
    client = services["client"]
    for key in ("container_name", "hostname", "ports"):
        assert key not in client, (
            f"client must not set `{key}`: it breaks `--scale client=N` "
            "or gives every replica the same site name"
        )
    site = _environment(client).get("SAGMQ_SITE", "")
    assert site.count("{n}") == 1, (
        "client needs SAGMQ_SITE with one {n} (site-{n}): each replica claims its own number"
    )
    assert "SAGMQ_SITE_QUEUE_EXPIRES_S" in _environment(client), "site queues of gone sites must expire"


def test_sagmq_services_wait_for_healthy_broker(services: dict) -> None:
    names = _sagmq_service_names(services)
    assert set(SAGMQ_SERVICES) <= set(names)
    for name in names:
        depends_on = services[name].get("depends_on")
        assert isinstance(depends_on, dict), (
            f"{name}: depends_on must use the long form with a condition"
        )
        rabbit = depends_on.get("rabbitmq")
        assert isinstance(rabbit, dict), f"{name}: does not depend on rabbitmq"
        assert rabbit.get("condition") == "service_healthy", (
            f"{name}: must wait for rabbitmq with condition service_healthy"
        )


def test_rabbitmq_has_fixed_hostname_and_healthcheck(services: dict) -> None:
    rabbit = services["rabbitmq"]
    hostname = rabbit.get("hostname")
    assert isinstance(hostname, str) and hostname, "rabbitmq needs a fixed hostname"
    assert "$" not in hostname, "rabbitmq hostname must not be interpolated"
    healthcheck = rabbit.get("healthcheck")
    assert isinstance(healthcheck, dict) and healthcheck.get("test"), (
        "rabbitmq needs a healthcheck with a test"
    )
    assert not healthcheck.get("disable", False)


def test_rabbitmq_ports_are_loopback_only(services: dict) -> None:
    for port in services["rabbitmq"].get("ports", []):
        if isinstance(port, dict):
            host_ip = port.get("host_ip")
        else:
            host_ip = str(port).split(":")[0] if str(port).count(":") == 2 else None
        assert host_ip == "127.0.0.1", f"rabbitmq port {port!r} is not bound to 127.0.0.1"


@pytest.mark.parametrize("name", SAGMQ_SERVICES)
def test_service_command(services: dict, name: str) -> None:
    cmd = _command(services[name])
    assert cmd[:3] == ["sagmq", "supervise", name], f"{name}: command should be `sagmq supervise {name}`, got {cmd}"


@pytest.mark.parametrize("name", SAGMQ_SERVICES)
def test_service_health_and_restart_policy(services: dict, name: str) -> None:
    svc = services[name]
    assert svc.get("healthcheck", {}).get("test") == ["CMD", "sagmq", "health"], name
    # supervise restarts crashes itself; Docker must leave exit 0 (shutdown) and 3 (credentials) down
    assert str(svc.get("restart")) == "no", f"{name}: restart must be \"no\" (deploy/README.md, Restarts)"
    assert svc.get("init") is True, name
    assert _environment(svc).get("SAGMQ_METRICS_PORT") == "9464", name


def test_images_are_variables_with_public_defaults(services: dict) -> None:
    expected = {"rabbitmq": ("SAGMQ_RABBITMQ_IMAGE", "rabbitmq:3.13-management"),
                "server": ("SAGMQ_IMAGE", "sagmq:latest"),
                "prometheus": ("SAGMQ_PROMETHEUS_IMAGE", "prom/prometheus:"),
                "grafana": ("SAGMQ_GRAFANA_IMAGE", "grafana/grafana:")}
    for name, (var, default) in expected.items():
        image = str(services[name]["image"])
        assert image.startswith("${" + var + ":-" + default), f"{name}: image {image!r}"
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in dockerfile
    assert "ARG WHEELHOUSE" in dockerfile


def test_job_service_runs_the_example_into_out(services: dict) -> None:
    job = services["job"]
    waits = job["depends_on"]
    for name in (*SAGMQ_SERVICES, "rabbitmq"):
        assert waits.get(name, {}).get("condition") == "service_healthy", f"job must wait for {name} healthy"
    targets = {str(v).split("}")[-1].split(":")[1] for v in job["volumes"]}
    assert {"/out", "/app/jobs"} <= targets
    script = "\n".join(_command(job))
    for step in ("sagmq submit", "sagmq wait", "sagmq download", "chown"):
        assert step in script, step
    assert "jobs/hello-numpy-sag" in _environment(job)["JOB_DIR"]
    assert "profiles" not in job, "`up` must start the job"


def test_amqp_url_matches_broker(services: dict) -> None:
    demo = _read_conf(ROOT / "deploy" / "rabbitmq" / "demo-user.conf")
    for name in _sagmq_service_names(services):
        url = _environment(services[name]).get("SAGMQ_AMQP_URL")
        assert url, f"{name}: SAGMQ_AMQP_URL is not set"
        parts = urlsplit(url)
        assert parts.scheme == "amqp", f"{name}: {url}"
        assert parts.hostname == "rabbitmq", f"{name}: broker host should be `rabbitmq`"
        assert parts.username == demo["default_user"], name
        assert parts.password == demo["default_pass"], name


def test_rabbitmq_mounts_config(services: dict) -> None:
    targets = {}
    for vol in services["rabbitmq"].get("volumes", []):
        if isinstance(vol, dict):
            source, target = str(vol.get("source", "")), str(vol.get("target", ""))
        else:
            source, target = str(vol).split(":")[:2]
        targets[Path(source).name] = target
    assert targets.get("rabbitmq.conf", "").startswith("/etc/rabbitmq/")
    assert targets.get("rabbitmq.conf", "").endswith(".conf")
    assert targets.get("enabled_plugins") == "/etc/rabbitmq/enabled_plugins"


def test_max_message_size_within_limit() -> None:
    conf = _read_conf(RABBITMQ_CONF)
    assert "max_message_size" in conf, "rabbitmq.conf must set max_message_size explicitly"
    value = conf["max_message_size"]
    assert re.fullmatch(r"\d+", value), f"max_message_size should be plain bytes, got {value!r}"
    assert 0 < int(value) <= MAX_MESSAGE_SIZE_LIMIT


def test_enabled_plugins() -> None:
    text = ENABLED_PLUGINS.read_text(encoding="utf-8").strip()
    assert text.endswith("]."), "enabled_plugins must be an Erlang list term ending in `].`"
    plugins = {p.strip() for p in text[text.index("[") + 1 : -2].split(",")}
    assert {"rabbitmq_management", "rabbitmq_prometheus"} <= plugins


def test_docker_compose_config_validates() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail(
            "docker-compose is not on PATH; install it "
            "(Debian: `apt-get install -y docker-compose`) to validate docker-compose.yml"
        )
    proc = subprocess.run(
        [exe, "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (
        f"`docker-compose config -q` failed ({proc.returncode}):\n"
        f"{proc.stdout}\n{proc.stderr}"
    )


# --- overlays, multi-host files and monitoring ------------------------------------------------

DEPLOY = ROOT / "deploy"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"


def _yaml(path: Path) -> dict:
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), path
    return data


def test_cluster_overlay_three_nodes_quorum_and_every_node_in_the_url(services: dict) -> None:
    cluster = _yaml(DEPLOY / "cluster.yml")["services"]
    conf = _read_conf(DEPLOY / "rabbitmq" / "cluster.conf")
    peers = {v for k, v in conf.items() if k.startswith("cluster_formation.classic_config.nodes.")}
    hostnames = {services["rabbitmq"]["hostname"], cluster["rabbitmq-2"]["hostname"], cluster["rabbitmq-3"]["hostname"]}
    assert peers == {f"rabbit@{h}" for h in hostnames}
    cookies = {_environment(cluster[n]).get("RABBITMQ_ERLANG_COOKIE") for n in ("rabbitmq", "rabbitmq-2", "rabbitmq-3")}
    assert len(cookies) == 1 and None not in cookies, "the three nodes need one Erlang cookie"
    for name in SAGMQ_SERVICES:
        env = _environment(cluster[name])
        assert env["SAGMQ_QUEUE_TYPE"] == "quorum", name
        hosts = {urlsplit(u).hostname for u in env["SAGMQ_AMQP_URL"].split(",")}
        assert hosts == hostnames, f"{name}: SAGMQ_AMQP_URL must list every node"
        assert set(cluster[name]["depends_on"]) == {"rabbitmq", "rabbitmq-2", "rabbitmq-3"}, name


def test_multihost_files_take_only_provisioned_settings() -> None:
    server = _yaml(DEPLOY / "multihost" / "server.yml")["services"]
    for name in ("server", "aggregator", "persistor"):
        assert str(server[name]["env_file"]).endswith(f"/services/{name}.env"), name
        assert any(str(v).endswith(":/etc/sagmq/tls:ro") for v in server[name]["volumes"]), name
        assert "SAGMQ_AMQP_URL" not in _environment(server[name]), f"{name}: the URL comes from the env file"
    broker_mounts = " ".join(str(v) for v in server["broker"]["volumes"])
    assert "definitions.json:/etc/rabbitmq/definitions.json" in broker_mounts
    assert "tls/rabbitmq.conf:/etc/rabbitmq/conf.d/" in broker_mounts
    assert "load_definitions = /etc/rabbitmq/definitions.json" in (DEPLOY / "multihost" / "rabbitmq.conf").read_text()
    site = _yaml(DEPLOY / "multihost" / "site.yml")["services"]["client"]
    assert any(str(v).endswith(":/etc/sagmq/tls:ro") for v in site["volumes"])
    assert site["command"] == ["sagmq", "supervise", "client"] and str(site["restart"]) == "no"


def test_provisioned_env_files_point_where_the_compose_files_mount_tls(tmp_path: Path) -> None:
    from sagmq.cli.main import main

    assert main(["provision", "--tls", "--out", str(tmp_path / "p"), "--sites", "site-1", "--host", "b.test"]) == 0
    env = dict(line.split("=", 1) for line in (tmp_path / "p" / "sites" / "site-1.env").read_text().splitlines()
               if line and not line.startswith("#"))
    for key in ("SAGMQ_TLS_CA_FILE", "SAGMQ_TLS_CERT_FILE", "SAGMQ_TLS_KEY_FILE"):
        assert env[key].startswith("/etc/sagmq/tls/"), key
    for name in ("ca.pem", "broker.pem", "broker.key", "site-1.pem", "site-1.key", "rabbitmq.conf"):
        assert (tmp_path / "p" / "tls" / name).is_file(), name


def test_prometheus_scrapes_broker_per_queue_and_every_service(services: dict) -> None:
    prom = _yaml(DEPLOY / "prometheus" / "prometheus.yml")
    assert "/etc/prometheus/alerts.yml" in prom["rule_files"]
    mounts = " ".join(str(v) for v in services["prometheus"]["volumes"])
    assert "alerts.yml:/etc/prometheus/alerts.yml" in mounts
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["rabbitmq-per-object"]["metrics_path"] == "/metrics/per-object"
    dns = jobs["sagmq"]["dns_sd_configs"][0]
    assert set(dns["names"]) == set(SAGMQ_SERVICES)
    assert dns["port"] == 9464
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"], name
        for port in services[name]["ports"]:
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"


def _exported_names() -> set[str]:
    """Every metric name the services (a fed server meter, with traffic) and RabbitMQ 3.10 export."""
    from sagmq.runtime.metrics import Meter
    from tests.unit.test_metrics import FakeRecord, FakeRounds, broker_names, samples

    m = Meter("server")
    m.follow(FakeRounds("j", record=FakeRecord(0, "t")))
    m.watch_sites(lambda: {"site-1": 0.0}, 10.0)
    m.count_sent("task", 10)
    m.count_received("result", 10)
    return {name for name, _ in samples(m)} | broker_names()


def test_grafana_dashboards_read_only_exported_metrics() -> None:
    from tests.unit.test_metrics import metric_names

    known = _exported_names()
    boards = sorted(DASHBOARDS.glob("*.json"))
    assert {b.name for b in boards} == {"rabbitmq-overview.json", "sagmq-rounds.json"}
    datasource = _yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    for board in boards:
        import json

        dash = json.loads(board.read_text())
        assert dash["panels"], board.name
        for panel in dash["panels"]:
            assert panel["datasource"]["uid"] == datasource["uid"], f"{board.name}: {panel['title']}"
            for target in panel["targets"]:
                names = metric_names(target["expr"])
                assert names, f"{board.name}: {panel['title']} reads no metric"
                assert names <= known, f"{board.name}: {panel['title']} reads unknown {sorted(names - known)}"
    used = {n for b in boards for p in json.loads(b.read_text())["panels"] for t in p["targets"]
            for n in metric_names(t["expr"])}
    for name in ("sagmq_rounds_finished_total", "sagmq_round_seconds_bucket", "sagmq_sites_alive",
                 "rabbitmq_queue_messages_ready", "rabbitmq_queue_consumers"):
        assert name in used, f"no dashboard shows {name}"


def test_grafana_provisioning_matches_the_mounts(services: dict) -> None:
    provider = _yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "sagmq.yml")["providers"][0]
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in services["grafana"]["volumes"]}
    assert mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"


@pytest.mark.parametrize("files", [("docker-compose.yml", "deploy/cluster.yml"), ("deploy/multihost/server.yml",),
                                   ("deploy/multihost/site.yml",)])
def test_overlays_validate(files: tuple[str, ...], tmp_path: Path) -> None:
    (tmp_path / "services").mkdir()
    for name in ("server", "aggregator", "persistor", "admin"):
        (tmp_path / "services" / f"{name}.env").write_text("SAGMQ_PREFIX=sag\n")
    (tmp_path / "site.env").write_text("SAGMQ_SITE=site-1\n")
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is not on PATH (Debian: apt-get install -y docker-compose)"
    args = [exe]
    for f in files:
        args += ["-f", str(ROOT / f)]
    proc = subprocess.run([*args, "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin:/usr/local/bin", "SAGMQ_BROKER_NETWORK": "n",
                               "SAGMQ_PROVISION_DIR": str(tmp_path), "SAGMQ_SITE_ENV": str(tmp_path / "site.env")})
    assert proc.returncode == 0, f"{files}: {proc.stdout}\n{proc.stderr}"
