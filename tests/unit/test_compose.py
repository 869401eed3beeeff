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
    assert "SAGMQ_SITE" not in _environment(client), (
        "client must not set SAGMQ_SITE: each replica takes its site name "
        "from its own container hostname"
    )


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
    assert cmd[:2] == ["sagmq", name], f"{name}: command should start with `sagmq {name}`, got {cmd}"


def test_amqp_url_matches_broker(services: dict) -> None:
    broker_env = _environment(services["rabbitmq"])
    for name in _sagmq_service_names(services):
        url = _environment(services[name]).get("SAGMQ_AMQP_URL")
        assert url, f"{name}: SAGMQ_AMQP_URL is not set"
        parts = urlsplit(url)
        assert parts.scheme == "amqp", f"{name}: {url}"
        assert parts.hostname == "rabbitmq", f"{name}: broker host should be `rabbitmq`"
        if "RABBITMQ_DEFAULT_USER" in broker_env:
            assert parts.username == broker_env["RABBITMQ_DEFAULT_USER"], name
            assert parts.password == broker_env.get("RABBITMQ_DEFAULT_PASS"), name


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
