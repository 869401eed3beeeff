"""load_settings: SAGMQ_* variables from a mapping, validated into a frozen Settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sagmq.wire.errors import ConfigError
from sagmq.wire.settings import DEFAULT_URL, Settings, check_name, load_settings

MIB = 2**20


def test_defaults() -> None:
    s = load_settings({})
    assert s == Settings()
    assert s.amqp_url == DEFAULT_URL == "amqp://guest:guest@localhost:5672/%2F"
    assert s.prefix == "sag"
    assert s.workspace == Path("workspace")
    assert s.site == ""
    assert s.heartbeat_s == 2.0
    assert s.client_timeout_s == 10.0
    assert s.schedule_timeout_s == 60.0
    assert s.max_body_bytes == 120 * MIB
    assert s.rpc_timeout_s == 30.0
    assert s.allow_custom_code is False
    assert s.log_level == "INFO"
    assert s.declare is True
    assert s.amqp_heartbeat_s == 30
    assert (s.tls_ca_file, s.tls_cert_file, s.tls_key_file, s.tls_server_name) == ("", "", "", "")
    assert s.amqp_user == "guest"
    assert (s.dead_max_length, s.dead_max_bytes, s.dead_ttl_s) == (10_000, 2**30, 7 * 86_400.0)


def test_empty_values_mean_defaults() -> None:
    keys = ["SAGMQ_AMQP_URL", "SAGMQ_PREFIX", "SAGMQ_WORKSPACE", "SAGMQ_SITE", "SAGMQ_HEARTBEAT_S",
            "SAGMQ_CLIENT_TIMEOUT_S", "SAGMQ_SCHEDULE_TIMEOUT_S", "SAGMQ_MAX_BODY_BYTES", "SAGMQ_RPC_TIMEOUT_S",
            "SAGMQ_ALLOW_CUSTOM_CODE", "SAGMQ_LOG_LEVEL", "SAGMQ_DECLARE", "SAGMQ_AMQP_HEARTBEAT_S",
            "SAGMQ_TLS_CA_FILE", "SAGMQ_TLS_CERT_FILE", "SAGMQ_TLS_KEY_FILE", "SAGMQ_TLS_SERVER_NAME",
            "SAGMQ_PIKA_FASTPATH", "SAGMQ_PERSIST_RETRY_LIMIT_S"]
    assert load_settings({k: "" for k in keys}) == Settings(pika_fastpath=True)


def test_persist_retry_limit() -> None:
    assert load_settings({}).persist_retry_limit_s == 300.0
    assert load_settings({"SAGMQ_PERSIST_RETRY_LIMIT_S": "0"}).persist_retry_limit_s == 0.0  # fail at once
    for bad in ("-1", "soon", "inf"):
        with pytest.raises(ConfigError, match="SAGMQ_PERSIST_RETRY_LIMIT_S"):
            load_settings({"SAGMQ_PERSIST_RETRY_LIMIT_S": bad})


def test_pika_fastpath_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings({"SAGMQ_PIKA_FASTPATH": "0"}).pika_fastpath is False
    assert load_settings({"SAGMQ_PIKA_FASTPATH": "1"}).pika_fastpath is True
    monkeypatch.setenv("SAGMQ_PIKA_FASTPATH", "0")  # reaches Settings built in code too
    assert Settings().pika_fastpath is False


def test_every_variable_is_parsed(tmp_path: Path) -> None:
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "cert.pem", "key.pem"))
    for f in (ca, cert, key):
        f.write_bytes(b"-----BEGIN-----\n")
    env = {
        "SAGMQ_AMQP_URL": "amqps://alice:secret@broker.example:5671/prod",
        "SAGMQ_PREFIX": "fl-1",
        "SAGMQ_WORKSPACE": "/tmp/ws",
        "SAGMQ_SITE": "site-7",
        "SAGMQ_HEARTBEAT_S": "0.5",
        "SAGMQ_CLIENT_TIMEOUT_S": "4",
        "SAGMQ_SCHEDULE_TIMEOUT_S": "0",
        "SAGMQ_MAX_BODY_BYTES": "1048576",
        "SAGMQ_RPC_TIMEOUT_S": "2.5",
        "SAGMQ_ALLOW_CUSTOM_CODE": "true",
        "SAGMQ_LOG_LEVEL": "debug",
        "SAGMQ_DECLARE": "no",
        "SAGMQ_AMQP_HEARTBEAT_S": "15",
        "SAGMQ_TLS_CA_FILE": str(ca),
        "SAGMQ_TLS_CERT_FILE": str(cert),
        "SAGMQ_TLS_KEY_FILE": str(key),
        "SAGMQ_TLS_SERVER_NAME": "broker.internal",
        "SAGMQ_CHUNK_BYTES": "65536",
        "SAGMQ_MAX_MODEL_BYTES": "1000000",
        "SAGMQ_CHUNK_TIMEOUT_S": "7",
        "SAGMQ_FORWARD_MIN_BYTES": "4096",
        "SAGMQ_AGGREGATOR_USER": "agg-1",
        "SAGMQ_PIKA_FASTPATH": "off",
        "SAGMQ_DEAD_MAX_LENGTH": "1000",
        "SAGMQ_DEAD_MAX_BYTES": "1e6",
        "SAGMQ_DEAD_TTL_S": "3600",
        "SAGMQ_PERSIST_RETRY_LIMIT_S": "42.5",
        "SAGMQ_SITE_QUEUE_EXPIRES_S": "600",
        "SAGMQ_QUEUE_TYPE": "Quorum",
        "SAGMQ_HEALTH_FILE": "/tmp/h.json",
        "SAGMQ_SIMULATION_USERS": "sim=site-1..site-9, lab-*; sim2=x",
        "SAGMQ_METRICS_PORT": "9464",
        "SAGMQ_MANAGEMENT_URL": "https://mgmt.internal:15671",
    }
    s = load_settings(env)
    assert s.amqp_url == env["SAGMQ_AMQP_URL"]
    assert s.prefix == "fl-1"
    assert s.workspace == Path("/tmp/ws")
    assert s.site == "site-7"
    assert s.heartbeat_s == 0.5
    assert s.client_timeout_s == 4.0
    assert s.schedule_timeout_s == 0.0
    assert s.max_body_bytes == MIB
    assert isinstance(s.max_body_bytes, int)
    assert s.rpc_timeout_s == 2.5
    assert s.allow_custom_code is True
    assert s.log_level == "DEBUG"
    assert s.declare is False
    assert s.amqp_heartbeat_s == 15
    assert isinstance(s.amqp_heartbeat_s, int)
    assert s.tls_ca_file == str(ca)
    assert s.tls_cert_file == str(cert)
    assert s.tls_key_file == str(key)
    assert s.tls_server_name == "broker.internal"
    assert s.amqp_user == "alice"
    assert (s.chunk_bytes, s.max_model_bytes, s.chunk_timeout_s) == (65536, 1000000, 7.0)
    assert (s.forward_min_bytes, s.aggregator_user) == (4096, "agg-1")
    assert s.pika_fastpath is False
    assert (s.dead_max_length, s.dead_max_bytes, s.dead_ttl_s) == (1000, 10**6, 3600.0)
    assert s.persist_retry_limit_s == 42.5
    assert (s.site_queue_expires_s, s.queue_type, s.health_file) == (600.0, "quorum", "/tmp/h.json")
    assert s.simulation_users == (("sim", ("site-1..site-9", "lab-*")), ("sim2", ("x",)))
    assert s.metrics_port == 9464
    assert s.management_url == "https://mgmt.internal:15671"
    # every field of Settings is covered by this test: a new setting needs a line above
    assert {f.name for f in dataclasses.fields(Settings)} == {
        "amqp_url", "prefix", "workspace", "site", "heartbeat_s", "client_timeout_s", "schedule_timeout_s",
        "max_body_bytes", "rpc_timeout_s", "allow_custom_code", "log_level", "declare", "amqp_heartbeat_s",
        "tls_ca_file", "tls_cert_file", "tls_key_file", "tls_server_name", "chunk_bytes", "max_model_bytes",
        "chunk_timeout_s", "forward_min_bytes", "aggregator_user", "pika_fastpath", "dead_max_length", "dead_max_bytes",
        "dead_ttl_s",
        "persist_retry_limit_s", "simulation_users", "management_url", "site_queue_expires_s", "queue_type", "health_file",
            "metrics_port"}


def test_dead_queue_bounds() -> None:
    keys = ("SAGMQ_DEAD_MAX_LENGTH", "SAGMQ_DEAD_MAX_BYTES", "SAGMQ_DEAD_TTL_S")
    assert load_settings({k: "" for k in keys}) == Settings(pika_fastpath=True)
    unbounded = load_settings({k: "0" for k in keys})  # no bound
    assert (unbounded.dead_max_length, unbounded.dead_max_bytes, unbounded.dead_ttl_s) == (0, 0, 0.0)
    for key in keys:
        with pytest.raises(ConfigError, match=key):
            load_settings({key: "-1"})
        with pytest.raises(ConfigError, match=key):
            load_settings({key: "lots"})


def test_prefetch_fits_the_largest_multi_part_message() -> None:
    s = load_settings({})
    assert s.max_parts == 4 * 2**30 // (16 * MIB) + 1  # 256 data parts and the header
    assert s.prefetch_for(blobs=2, slack=64) == 2 * 257 + 64
    small = load_settings({"SAGMQ_MAX_MODEL_BYTES": str(100 * MIB + 1)})
    assert small.max_parts == 8 and small.prefetch_for(blobs=1, slack=0) == 8
    assert load_settings({"SAGMQ_CHUNK_BYTES": "4096"}).prefetch_for(blobs=1, slack=0) == 65535  # AMQP's limit


def test_chunk_bytes_must_fit_below_the_body_limit() -> None:
    with pytest.raises(ConfigError, match="SAGMQ_CHUNK_BYTES"):
        load_settings({"SAGMQ_MAX_BODY_BYTES": "1048576", "SAGMQ_CHUNK_BYTES": "1048576"})
    assert load_settings({"SAGMQ_MAX_BODY_BYTES": "1048576"}).chunk_bytes == 1048576 - 65536


@pytest.mark.parametrize(("raw", "want"), [("1", True), ("TRUE", True), ("yes", True), ("Yes", True), ("on", True),
                                           ("0", False), ("false", False), ("no", False), ("OFF", False)])
@pytest.mark.parametrize("key", ["SAGMQ_ALLOW_CUSTOM_CODE", "SAGMQ_DECLARE"])
def test_boolean_values(key: str, raw: str, want: bool) -> None:
    field = {"SAGMQ_ALLOW_CUSTOM_CODE": "allow_custom_code", "SAGMQ_DECLARE": "declare"}[key]
    assert getattr(load_settings({key: raw}), field) is want


@pytest.mark.parametrize("raw", ["maybe", "2", "y es"])
@pytest.mark.parametrize("key", ["SAGMQ_ALLOW_CUSTOM_CODE", "SAGMQ_DECLARE"])
def test_bad_boolean_values(key: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_settings({key: raw})


@pytest.mark.parametrize("key", ["SAGMQ_TLS_CA_FILE", "SAGMQ_TLS_CERT_FILE", "SAGMQ_TLS_KEY_FILE"])
def test_missing_tls_file(key: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=key):
        load_settings({key: str(tmp_path / "absent.pem")})
    with pytest.raises(ConfigError, match=key):
        load_settings({key: str(tmp_path)})  # a directory is not a file


@pytest.mark.parametrize("level", ["DEBUG", "info", "Warning", "ERROR"])
def test_log_levels(level: str) -> None:
    assert load_settings({"SAGMQ_LOG_LEVEL": level}).log_level == level.upper()


def test_settings_are_frozen() -> None:
    s = load_settings({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.prefix = "x"  # type: ignore[misc]


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://guest:guest@localhost:5672/", "localhost:5672", "amqpx://h/",
                                 "redis://h", "guest@localhost"])
def test_bad_url_scheme(url: str) -> None:
    with pytest.raises(ConfigError, match="SAGMQ_AMQP_URL"):
        load_settings({"SAGMQ_AMQP_URL": url})


@pytest.mark.parametrize("prefix", ["a b", "-x", ".x", "a/b", "a:b", "x" * 64, "é", "a*"])
def test_bad_prefix(prefix: str) -> None:
    with pytest.raises(ConfigError, match="SAGMQ_PREFIX"):
        load_settings({"SAGMQ_PREFIX": prefix})


@pytest.mark.parametrize("site", ["site 1", "-site", "site/1", "s" * 64, "site#1", "../x"])
def test_bad_site(site: str) -> None:
    with pytest.raises(ConfigError, match="SAGMQ_SITE"):
        load_settings({"SAGMQ_SITE": site})


@pytest.mark.parametrize("name", ["sag\n", "site-1\n"])
def test_names_with_a_trailing_newline_are_refused(name: str) -> None:
    # '$' in a regex also matches before a final newline; a queue name must not end with one.
    with pytest.raises(ConfigError):
        check_name("SAGMQ_PREFIX", name)
    with pytest.raises(ConfigError):
        load_settings({"SAGMQ_PREFIX": name})


def test_longest_name_is_63_chars() -> None:
    assert load_settings({"SAGMQ_SITE": "s" * 63}).site == "s" * 63


def test_with_site_validates() -> None:
    s = load_settings({})
    assert s.with_site("site-2").site == "site-2"
    assert s.site == ""
    with pytest.raises(ConfigError):
        s.with_site("bad site")


@pytest.mark.parametrize("level", ["TRACE", "CRITICAL", "verbose", "1"])
def test_bad_log_level(level: str) -> None:
    with pytest.raises(ConfigError, match="SAGMQ_LOG_LEVEL"):
        load_settings({"SAGMQ_LOG_LEVEL": level})


@pytest.mark.parametrize("key", ["SAGMQ_HEARTBEAT_S", "SAGMQ_CLIENT_TIMEOUT_S", "SAGMQ_SCHEDULE_TIMEOUT_S",
                                 "SAGMQ_RPC_TIMEOUT_S", "SAGMQ_MAX_BODY_BYTES", "SAGMQ_AMQP_HEARTBEAT_S"])
@pytest.mark.parametrize("raw", ["fast", "2s", "1,5"])
def test_non_numeric_values(key: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_settings({key: raw})


@pytest.mark.parametrize(("key", "raw"), [("SAGMQ_HEARTBEAT_S", "0.05"), ("SAGMQ_HEARTBEAT_S", "-1"),
                                          ("SAGMQ_CLIENT_TIMEOUT_S", "0.1"), ("SAGMQ_SCHEDULE_TIMEOUT_S", "-1"),
                                          ("SAGMQ_RPC_TIMEOUT_S", "0"), ("SAGMQ_MAX_BODY_BYTES", "100"),
                                          ("SAGMQ_AMQP_HEARTBEAT_S", "0")])
def test_values_below_minimum(key: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_settings({key: raw})


@pytest.mark.parametrize("key", ["SAGMQ_HEARTBEAT_S", "SAGMQ_CLIENT_TIMEOUT_S", "SAGMQ_RPC_TIMEOUT_S",
                                 "SAGMQ_SCHEDULE_TIMEOUT_S"])
def test_nan_durations_are_refused(key: str) -> None:
    # float('nan') < minimum is False, so a plain comparison lets NaN through.
    with pytest.raises(ConfigError, match=key):
        load_settings({key: "nan"})


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", ["SAGMQ_MAX_BODY_BYTES", "SAGMQ_AMQP_HEARTBEAT_S"])
def test_non_finite_integer_settings_are_a_config_error(key: str, raw: str) -> None:
    # int(float('nan')) raises ValueError and int(float('inf')) OverflowError: neither is a ConfigError.
    with pytest.raises(ConfigError, match=key):
        load_settings({key: raw})


def test_max_body_bytes_above_128_mib() -> None:
    with pytest.raises(ConfigError, match="SAGMQ_MAX_BODY_BYTES"):
        load_settings({"SAGMQ_MAX_BODY_BYTES": str(128 * MIB + 1)})
    with pytest.raises(ConfigError, match="SAGMQ_MAX_BODY_BYTES"):
        load_settings({"SAGMQ_MAX_BODY_BYTES": str(200 * MIB)})


def test_max_body_bytes_within_limit() -> None:
    assert load_settings({"SAGMQ_MAX_BODY_BYTES": str(64 * MIB)}).max_body_bytes == 64 * MIB
    assert load_settings({"SAGMQ_MAX_BODY_BYTES": "1024"}).max_body_bytes == 1024


# --- amqp_user -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "user"),
    [
        ("amqp://alice:pw@h:5672/%2F", "alice"),
        ("amqp://al%40ice:p%3Aw@h/", "al@ice"),
        ("amqps://site%2D1:pw@h/", "site-1"),
        ("amqp://h:5672/", "guest"),
        ("amqp://bob@h/", "bob"),
    ],
)
def test_amqp_user_from_url(url: str, user: str) -> None:
    assert load_settings({"SAGMQ_AMQP_URL": url}).amqp_user == user


# --- issue 12: several broker URLs, site-{n}, queue type, site queue expiry ---------------------------


def test_several_broker_urls() -> None:
    s = load_settings({"SAGMQ_AMQP_URL": "amqp://alice:pw@node-1:5672/v, amqp://bob:pw@node-2:5672/v,"})
    assert s.amqp_urls == ("amqp://alice:pw@node-1:5672/v", "amqp://bob:pw@node-2:5672/v")
    assert s.amqp_user == "alice"  # the user of the first
    assert load_settings({}).amqp_urls == (DEFAULT_URL,)
    with pytest.raises(ConfigError, match="http://node-2"):
        load_settings({"SAGMQ_AMQP_URL": "amqp://a:b@node-1/v,http://node-2"})


def test_site_number_template() -> None:
    assert load_settings({"SAGMQ_SITE": "site-{n}"}).site == "site-{n}"
    for bad in ("site-{n}-{n}", "{x}", "site {n}"):
        with pytest.raises(ConfigError, match="SAGMQ_SITE"):
            load_settings({"SAGMQ_SITE": bad})


def test_queue_type_and_site_queue_expiry() -> None:
    s = load_settings({})
    assert (s.queue_type, s.site_queue_expires_s, s.health_file) == ("classic", 86_400.0, "")
    assert load_settings({"SAGMQ_SITE_QUEUE_EXPIRES_S": "0"}).site_queue_expires_s == 0.0  # never
    with pytest.raises(ConfigError, match="SAGMQ_QUEUE_TYPE"):
        load_settings({"SAGMQ_QUEUE_TYPE": "stream"})
    with pytest.raises(ConfigError, match="SAGMQ_SITE_QUEUE_EXPIRES_S"):
        load_settings({"SAGMQ_SITE_QUEUE_EXPIRES_S": "-1"})
