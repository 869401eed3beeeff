"""One frozen Settings object built from SAGMQ_* environment variables, validated at start."""

from __future__ import annotations

import difflib
import fnmatch
import functools
import logging
import math
import os
import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from sagmq.wire.errors import ConfigError

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
log = logging.getLogger(__name__)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}")


@functools.lru_cache(maxsize=16)
def _url_user(url: str) -> str:
    """(Checked against every message's user_id: parsed once; of the first URL of a list.)"""
    return unquote(urlparse(split_urls(url)[0]).username or "guest")


def split_urls(url: str) -> tuple[str, ...]:
    """SAGMQ_AMQP_URL as a list: one URL, or several separated by commas (the nodes of a cluster)."""
    return tuple(u.strip() for u in url.split(",") if u.strip()) or (url,)


SITE_NUMBER = "{n}"  # in SAGMQ_SITE: the lowest free number >= 1 is claimed at start (sagmq.client.claim)
QUEUE_TYPES = ("classic", "quorum")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a sagmq process reads from its environment."""

    amqp_url: str = DEFAULT_URL
    prefix: str = "sag"
    workspace: Path = Path("workspace")
    site: str = ""
    heartbeat_s: float = 2.0
    client_timeout_s: float = 10.0
    schedule_timeout_s: float = 60.0
    max_body_bytes: int = 120 * 2**20
    rpc_timeout_s: float = 30.0
    allow_custom_code: bool = False
    log_level: str = "INFO"
    declare: bool = True
    chunk_bytes: int = 16 * 2**20
    max_model_bytes: int = 4 * 2**30
    chunk_timeout_s: float = 60.0
    forward_min_bytes: int = 2**20
    aggregator_user: str = "aggregator"
    amqp_heartbeat_s: int = 30
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_server_name: str = ""
    # the dead-letter queue's bounds (queue arguments, fixed when the queue is created; see topology.py):
    # at most this many messages and bytes, the oldest dropped first, each kept at most this long (0: no limit)
    dead_max_length: int = 10_000
    dead_max_bytes: int = 2**30
    dead_ttl_s: float = 7 * 86_400.0
    # persistor: how long a save the disk refuses is retried before the job fails with the disk's error
    persist_retry_limit_s: float = 300.0
    # site queues: x-expires (a queue no one consumes nor redeclares for this long is deleted, with a
    # forwarded model it may hold; a site redeclares its queue at every connect); 0: never
    site_queue_expires_s: float = 86_400.0
    # x-queue-type of every durable queue: classic, or quorum (replicated on a cluster; see topology.py)
    queue_type: str = "classic"
    # the health file the service loop writes (sagmq.runtime.health); "": <workspace>/health/<service>[-<site>].json
    health_file: str = ""
    # pika's internals for speed (sagmq.amqp.fastpath), where this pika has them; SAGMQ_PIKA_FASTPATH=0
    # turns them off. The default is read from the environment even for a Settings built in code
    # (tests, tools), so the switch reaches every bus of a process.
    pika_fastpath: bool = field(default_factory=lambda: _bool(os.environ, "SAGMQ_PIKA_FASTPATH", True))
    # simulation (SAGMQ_SIMULATION_USERS): broker users allowed to speak for a set of sites each, for a
    # process that runs many sites over one connection (`sagmq client --sites`); empty: one user per site
    simulation_users: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # the management HTTP API `sagmq status`/`watch`/`teardown` read queues from ("": http://<AMQP host>:15672)
    management_url: str = ""
    # the port the service serves its Prometheus metrics on (sagmq.runtime.metrics); 0: none
    metrics_port: int = 0

    @property
    def max_parts(self) -> int:
        """The parts of the largest multi-part message a service accepts, its header part included:
        a consumer that holds parts until the whole message is in needs a prefetch of at least this."""
        return math.ceil(self.max_model_bytes / self.chunk_bytes) + 1

    def prefetch_for(self, blobs: int, slack: int) -> int:
        """A consumer prefetch with room for `blobs` of the largest multi-part messages held unacked until
        whole, and `slack` messages besides (AMQP caps a prefetch at 65535)."""
        return min(65535, blobs * self.max_parts + slack)

    @property
    def amqp_urls(self) -> tuple[str, ...]:
        """The broker URLs to try in turn (SAGMQ_AMQP_URL may list several, comma-separated)."""
        return split_urls(self.amqp_url)

    @property
    def amqp_user(self) -> str:
        """The user name in the AMQP URL (the broker validates it as user_id)."""
        return _url_user(self.amqp_url)

    def may_speak_for(self, user: str | None, site: str) -> bool:
        """Whether a message validated as from broker user `user` may speak for `site`: the site's own
        user, this service's own user (a one-user deployment), or a simulation user whose sites include it."""
        if not user:
            return False
        if user == site or user == self.amqp_user:
            return True
        return any(u == user and any(site_matches(p, site) for p in pats) for u, pats in self.simulation_users)

    def with_site(self, site: str) -> Settings:
        """A copy naming this process's site, validated."""
        check_name("site", site)
        return replace(self, site=site)


def check_name(what: str, value: str) -> str:
    """Refuse names that could not be part of a queue name or a file name."""
    if not _NAME.fullmatch(value):
        raise ConfigError(
            f"{what} {value!r} is not a valid name (letters, digits, '_', '.', '-'; at most 63 chars)"
        )
    return value


_RANGE = re.compile(r"(.*?)(\d+)\.\.(.*?)(\d+)")


def site_range(spec: str) -> tuple[str, int, int] | None:
    """`site-1..site-500` as (prefix, first, last); None if spec is not a range. Both ends must share
    the prefix, and first <= last."""
    m = _RANGE.fullmatch(spec.strip())
    if m is None:
        return None
    prefix, a, prefix2, b = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
    if prefix2 and prefix2 != prefix:
        raise ConfigError(f"site range {spec!r}: both ends need the same prefix ({prefix!r} vs {prefix2!r})")
    if a > b:
        raise ConfigError(f"site range {spec!r}: the first number is larger than the last")
    return prefix, a, b


def site_matches(pattern: str, site: str) -> bool:
    """Whether site is one of pattern's: a range (`site-1..site-500`, numbers without leading zeros), a
    glob (`lab-*`) or a plain name."""
    rng = site_range(pattern)
    if rng is not None:
        prefix, a, b = rng
        num = site[len(prefix):]
        return site.startswith(prefix) and num.isdigit() and str(int(num)) == num and a <= int(num) <= b
    return fnmatch.fnmatchcase(site, pattern)


def parse_simulation_users(raw: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """SAGMQ_SIMULATION_USERS: `user=pattern,pattern;user2=pattern`, each pattern a range, glob or name."""
    out: list[tuple[str, tuple[str, ...]]] = []
    for entry in filter(None, (e.strip() for e in raw.split(";"))):
        user, eq, pats = entry.partition("=")
        patterns = tuple(p.strip() for p in pats.split(",") if p.strip())
        if not eq or not user.strip() or not patterns:
            raise ConfigError(f"SAGMQ_SIMULATION_USERS entry {entry!r} is not user=pattern[,pattern...]")
        for p in patterns:
            site_range(p)  # a malformed range fails here, at start
        out.append((user.strip(), patterns))
    return tuple(out)


def _float(env: Mapping[str, str], key: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as e:
        raise ConfigError(f"{key}={raw!r} is not a number") from e
    if not math.isfinite(value):
        raise ConfigError(f"{key}={raw!r} must be a finite number")
    if value < minimum:
        raise ConfigError(f"{key}={raw!r} must be >= {minimum}")
    return value


def _bool(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = (env.get(key) or "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}={raw!r} is not a boolean (1/0, true/false, yes/no)")


def _port(env: Mapping[str, str], key: str) -> int:
    raw = (env.get(key) or "").strip()
    if raw == "":
        return 0
    if not raw.isdigit() or int(raw) > 65535:
        raise ConfigError(f"{key}={raw!r} is not a TCP port (0 to 65535; 0: off)")
    return int(raw)


def _file(env: Mapping[str, str], key: str) -> str:
    raw = env.get(key) or ""
    if raw and not Path(raw).is_file():
        raise ConfigError(f"{key}={raw!r}: no such file")
    return raw


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from the environment (or the mapping given), raising ConfigError."""
    if env is None:
        warn_unknown_variables(os.environ)
    env = os.environ if env is None else env
    url = env.get("SAGMQ_AMQP_URL") or DEFAULT_URL
    for one in split_urls(url):
        if urlparse(one).scheme not in ("amqp", "amqps"):
            raise ConfigError(f"SAGMQ_AMQP_URL must start with amqp:// or amqps:// (each URL of a comma-separated "
                              f"list), got {one!r}")
    prefix = check_name("SAGMQ_PREFIX", env.get("SAGMQ_PREFIX") or "sag")
    site = env.get("SAGMQ_SITE") or ""
    if site:
        check_name("SAGMQ_SITE", site.replace(SITE_NUMBER, "1", 1))
    queue_type = (env.get("SAGMQ_QUEUE_TYPE") or "classic").strip().lower()
    if queue_type not in QUEUE_TYPES:
        raise ConfigError(f"SAGMQ_QUEUE_TYPE={queue_type!r} is not one of {', '.join(QUEUE_TYPES)}")
    level = (env.get("SAGMQ_LOG_LEVEL") or "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"SAGMQ_LOG_LEVEL={level!r} is not one of DEBUG, INFO, WARNING, ERROR")
    max_body = int(_float(env, "SAGMQ_MAX_BODY_BYTES", 120 * 2**20, 1024))
    if max_body > 128 * 2**20:
        raise ConfigError("SAGMQ_MAX_BODY_BYTES must stay below the broker's 128 MiB max_message_size")
    chunk = int(_float(env, "SAGMQ_CHUNK_BYTES", min(16 * 2**20, max(4096, max_body - 2**16)), 4096))
    if chunk > max(4096, max_body - 2**16):
        raise ConfigError("SAGMQ_CHUNK_BYTES must stay 64 KiB below SAGMQ_MAX_BODY_BYTES")
    return Settings(
        amqp_url=url,
        management_url=env.get("SAGMQ_MANAGEMENT_URL") or "",
        chunk_bytes=chunk,
        max_model_bytes=int(_float(env, "SAGMQ_MAX_MODEL_BYTES", 4 * 2**30, 1)),
        chunk_timeout_s=_float(env, "SAGMQ_CHUNK_TIMEOUT_S", 60.0, 0.1),
        forward_min_bytes=int(_float(env, "SAGMQ_FORWARD_MIN_BYTES", 2**20, 0)),
        aggregator_user=env.get("SAGMQ_AGGREGATOR_USER") or "aggregator",
        prefix=prefix,
        workspace=Path(env.get("SAGMQ_WORKSPACE") or "workspace"),
        site=site,
        heartbeat_s=_float(env, "SAGMQ_HEARTBEAT_S", 2.0, 0.1),
        client_timeout_s=_float(env, "SAGMQ_CLIENT_TIMEOUT_S", 10.0, 0.5),
        schedule_timeout_s=_float(env, "SAGMQ_SCHEDULE_TIMEOUT_S", 60.0, 0.0),
        max_body_bytes=max_body,
        rpc_timeout_s=_float(env, "SAGMQ_RPC_TIMEOUT_S", 30.0, 0.1),
        allow_custom_code=_bool(env, "SAGMQ_ALLOW_CUSTOM_CODE", False),
        log_level=level,
        declare=_bool(env, "SAGMQ_DECLARE", True),
        amqp_heartbeat_s=int(_float(env, "SAGMQ_AMQP_HEARTBEAT_S", 30, 1)),
        tls_ca_file=_file(env, "SAGMQ_TLS_CA_FILE"),
        tls_cert_file=_file(env, "SAGMQ_TLS_CERT_FILE"),
        tls_key_file=_file(env, "SAGMQ_TLS_KEY_FILE"),
        tls_server_name=env.get("SAGMQ_TLS_SERVER_NAME") or "",
        dead_max_length=int(_float(env, "SAGMQ_DEAD_MAX_LENGTH", 10_000, 0)),
        dead_max_bytes=int(_float(env, "SAGMQ_DEAD_MAX_BYTES", 2**30, 0)),
        dead_ttl_s=_float(env, "SAGMQ_DEAD_TTL_S", 7 * 86_400.0, 0.0),
        persist_retry_limit_s=_float(env, "SAGMQ_PERSIST_RETRY_LIMIT_S", 300.0, 0.0),
        site_queue_expires_s=_float(env, "SAGMQ_SITE_QUEUE_EXPIRES_S", 86_400.0, 0.0),
        queue_type=queue_type,
        health_file=env.get("SAGMQ_HEALTH_FILE") or "",
        pika_fastpath=_bool(env, "SAGMQ_PIKA_FASTPATH", True),
        metrics_port=_port(env, "SAGMQ_METRICS_PORT"),
        simulation_users=parse_simulation_users(env.get("SAGMQ_SIMULATION_USERS") or ""),
    )


# SAGMQ_* variables read outside load_settings (by the process runner, the tests)
OTHER_VARIABLES = frozenset({"SAGMQ_EXIT_WITH_PARENT", "SAGMQ_CHAOS_SEEDS", "SAGMQ_TEST_RABBITMQ_BIN"})


class _ReadKeys(Mapping[str, str]):
    """A mapping that records which keys were asked for (so the known variables are the ones read)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self.env[key]

    def get(self, key: str, default: Any = None) -> Any:
        """Record the key, then look it up."""
        self.read.add(key)
        return self.env.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self.env)

    def __len__(self) -> int:
        return len(self.env)


def unknown_variables(env: Mapping[str, str]) -> list[tuple[str, str]]:
    """Each SAGMQ_* variable of env that sagmq does not read, with the closest known name ("" if none is
    close): a typo such as SAGMQ_AMQP_ULR would otherwise be ignored without a word."""
    rec = _ReadKeys(env)
    try:
        load_settings(rec)
    except ConfigError:
        # the real load fails with its own message and its reads stopped early: the names a load of
        # the defaults reads complete the list, so a typo is told beside the invalid setting too
        defaults = _ReadKeys({k: v for k, v in env.items() if not k.startswith("SAGMQ_")})
        try:
            load_settings(defaults)
        except ConfigError:
            return []
        rec.read |= defaults.read
    known = rec.read | OTHER_VARIABLES
    out = []
    for name in sorted(k for k in env if k.startswith("SAGMQ_") and k not in known):
        # compared without the common SAGMQ_, which would make every name look close
        close = difflib.get_close_matches(name[6:], sorted(k[6:] for k in known), n=1, cutoff=0.6)
        out.append((name, f"SAGMQ_{close[0]}" if close else ""))
    return out


def warn_unknown_variables(env: Mapping[str, str]) -> None:
    """Log one warning per unknown SAGMQ_* variable, naming the closest known one."""
    for name, close in unknown_variables(env):
        log.warning("unknown variable %s is ignored%s", name, f" (did you mean {close}?)" if close else "")


def default_site_name() -> str:
    """The hostname, so that scaled containers get distinct site names."""
    host = socket.gethostname().split(".")[0] or "site"
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", host)[:63]
