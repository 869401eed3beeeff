"""One frozen Settings object built from SAGMQ_* environment variables, validated at start."""

from __future__ import annotations

import functools
import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import unquote, urlparse

from sagmq.wire.errors import ConfigError

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}")


@functools.lru_cache(maxsize=16)
def _url_user(url: str) -> str:
    """(Checked against every message's user_id: parsed once.)"""
    return unquote(urlparse(url).username or "guest")


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
    # pika's internals for speed (sagmq.amqp.fastpath), where this pika has them; SAGMQ_PIKA_FASTPATH=0
    # turns them off. The default is read from the environment even for a Settings built in code
    # (tests, tools), so the switch reaches every bus of a process.
    pika_fastpath: bool = field(default_factory=lambda: _bool(os.environ, "SAGMQ_PIKA_FASTPATH", True))

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
    def amqp_user(self) -> str:
        """The user name in the AMQP URL (the broker validates it as user_id)."""
        return _url_user(self.amqp_url)

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


def _file(env: Mapping[str, str], key: str) -> str:
    raw = env.get(key) or ""
    if raw and not Path(raw).is_file():
        raise ConfigError(f"{key}={raw!r}: no such file")
    return raw


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from the environment (or the mapping given), raising ConfigError."""
    env = os.environ if env is None else env
    url = env.get("SAGMQ_AMQP_URL") or DEFAULT_URL
    parsed = urlparse(url)
    if parsed.scheme not in ("amqp", "amqps"):
        raise ConfigError(f"SAGMQ_AMQP_URL must start with amqp:// or amqps://, got {url!r}")
    prefix = check_name("SAGMQ_PREFIX", env.get("SAGMQ_PREFIX") or "sag")
    site = env.get("SAGMQ_SITE") or ""
    if site:
        check_name("SAGMQ_SITE", site)
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
        pika_fastpath=_bool(env, "SAGMQ_PIKA_FASTPATH", True),
    )


def default_site_name() -> str:
    """The hostname, so that scaled containers get distinct site names."""
    host = socket.gethostname().split(".")[0] or "site"
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", host)[:63]
