"""The services' Prometheus metrics (sagmq.runtime.metrics) without a broker: what a Meter counts and
exports, the server's rounds on the in-memory system, the HTTP endpoint, and the alert rules file
checked against the names that really exist (sagmq's, and RabbitMQ 3.10's captured in data/)."""

from __future__ import annotations

import importlib.metadata
import re
import socket
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sagmq.aggregator.main import AggregatorService
from sagmq.client.main import ClientService
from sagmq.job.examples import example_job
from sagmq.job.spec import read_job_folder
from sagmq.memory import MemoryBroker
from sagmq.persistor.main import PersistorService
from sagmq.runtime.metrics import (
    KINDS,
    PHASES,
    REASON_LABELS,
    Meter,
    meter_of,
    reason_label,
    serve_metrics,
    version,
)
from sagmq.server.main import ServerService
from sagmq.server.scatter_and_gather import Phase
from sagmq.wire.errors import ConfigError
from sagmq.wire.messages import BY_TYPE, FINISHED, AdminReply, AdminRequest, JobEvent
from sagmq.wire.settings import Settings, load_settings
from sagmq.wire.topology import RK_ADMIN_SERVER
from tests.unit.choreography.harness import LIMIT, Probe, running, service_bus

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
BROKER_NAMES = Path(__file__).parent / "data" / "rabbitmq-3.10-metrics.txt"
PROMTOOL_TEST = Path(__file__).parent / "data" / "alerts-promtool-test.yml"


def samples(meter: Meter) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the meter's registry, as Prometheus would scrape it: (name, labels) -> value."""
    text = generate_latest(meter.registry()).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(meter: Meter, name: str, **labels: str) -> float:
    return samples(meter)[(name, tuple(sorted(labels.items())))]


# --- counting and exposition --------------------------------------------------------------------------


def test_traffic_is_counted_by_direction_and_kind_with_unknown_kinds_folded() -> None:
    m = Meter("client", "site-1")
    for _ in range(3):
        m.count_sent("result", 1000)
    m.count_received("task", 500)
    m.count_received("task", 700)
    for junk in ("x" * 100, "evil.kind", "", None):  # a peer's type property is not a label value
        m.count_received(junk, 1)
    got = samples(m)
    assert got[("sagmq_messages_total", (("direction", "sent"), ("kind", "result")))] == 3
    assert got[("sagmq_bytes_total", (("direction", "sent"), ("kind", "result")))] == 3000
    assert got[("sagmq_messages_total", (("direction", "received"), ("kind", "task")))] == 2
    assert got[("sagmq_bytes_total", (("direction", "received"), ("kind", "task")))] == 1200
    assert got[("sagmq_messages_total", (("direction", "received"), ("kind", "other")))] == 4
    kinds = {dict(labels)["kind"] for name, labels in got if name == "sagmq_messages_total"}
    assert kinds == {"result", "task", "other"}
    assert got[("sagmq_service_info", (("service", "client"), ("site", "site-1"), ("version", version())))] == 1
    assert version() == importlib.metadata.version("sagmq")


def test_kinds_are_the_wire_types() -> None:
    assert set(BY_TYPE) < KINDS and KINDS - set(BY_TYPE) == {"dead", "other"}


def test_dead_letters_and_reconnects() -> None:
    m = Meter("aggregator")
    m.count_dead_letter("spoofed sender: user 'site-2' sent a result for site 'site-1'")
    m.count_dead_letter("internal error: KeyError: 'x'")
    m.count_dead_letter("internal error: ValueError: y")
    m.count_dead_letter("a reason no rule knows")
    m.count_reconnect()
    assert value(m, "sagmq_dead_letters_total", reason="sender") == 1
    assert value(m, "sagmq_dead_letters_total", reason="internal") == 2
    assert value(m, "sagmq_dead_letters_total", reason="other") == 1
    assert value(m, "sagmq_dead_letters_total", reason="decode") == 0  # every reason is there from the start
    assert value(m, "sagmq_reconnects_total") == 1
    assert not any(name.startswith("sagmq_round") for name, _ in samples(m))  # only the server has rounds


# one reason text of each kind, as the services write them
REASON_EXAMPLES = {
    "internal error: AttributeError: 'NoneType' object has no attribute 'x'": "internal",
    "handling it made the broker refuse an operation: 403": "broker_refused",
    "spoofed sender: user 'a' sent a heartbeat for site 'b'": "sender",
    "result without a user_id property: the sender is unknown": "sender",
    "header site 'a' does not match body site 'b'": "sender",
    "task 1 of job 2 is not addressed to site site-1": "sender",
    "the server queue does not take 'junk' messages": "wrong_type",
    "the results queue takes result messages, not 'task'": "wrong_type",
    "duplicate: a contribution from site site-1 was already accepted this round": "duplicate",
    "stale or wrong round: result for round 1, round 2 is open": "stale",
    "late: round 3 closed before all 5 parts arrived": "stale",
    "result for task a, not the current task b of round 1": "stale",
    "unknown job 'x' or round 1 (no round.open within 10 s)": "stale",
    "round.close for round 1 of job x, which is not open": "stale",
    "site site-1 returned rc EXECUTION_EXCEPTION: boom": "site_error",
    "site site-9 is not a target of this round": "not_target",
    "variable 'x' holds NaN or Inf": "not_finite",
    "variable 'x' has shape (2,), the model has (3, 3)": "model_mismatch",
    "expected data kind WEIGHTS but got WEIGHT_DIFF": "model_mismatch",
    "site site-1 sent no DXO": "model_mismatch",
    "result of 999 bytes exceeds SAGMQ_MAX_MODEL_BYTES=10": "too_large",
    "body of 200 bytes exceeds the limit of 100": "too_large",
    "incomplete blob abc: parts [3] of 4 missing after 60 s": "incomplete",
    "part 3 of blob abc without its header": "incomplete",
    "the persistor could not save round 2 of job x for 300 s": "disk",
    "meta NUM_STEPS_CURRENT_ROUND=-1 is not a non-negative number": "meta",
    "result: field 'site' is missing": "decode",
    "msgpack ext type 9 is not part of the sagmq wire format": "decode",
    "task.dxo: dtype '|O' is not allowed": "decode",
    "something new": "other",
}


@pytest.mark.parametrize(("reason", "label"), sorted(REASON_EXAMPLES.items()))
def test_reason_labels(reason: str, label: str) -> None:
    assert reason_label(reason) == label
    assert label in REASON_LABELS


def test_phases_are_the_round_cores_and_idle() -> None:
    assert set(PHASES) == {p.value for p in Phase} | {"idle"}


def test_meters_in_one_process_are_independent() -> None:
    """Several services in one process (tests, a process of many sites) never share nor double-register."""
    a, b = Meter("server"), Meter("server")
    a.count_sent("task", 10)
    assert a.registry() is a.registry() and a.registry() is not b.registry()
    assert value(a, "sagmq_messages_total", direction="sent", kind="task") == 1
    assert ("sagmq_messages_total", (("direction", "sent"), ("kind", "task"))) not in samples(b)


def test_meter_of_finds_the_bus_meter_or_makes_one() -> None:
    @dataclass
    class WithMeter:
        meter: Meter = field(default_factory=lambda: Meter("x"))

    bus = WithMeter()
    assert meter_of(bus) is bus.meter
    made = meter_of(object(), "server")
    assert isinstance(made, Meter) and made.service == "server"


# --- the server's rounds, on the in-memory system --------------------------------------------------------


def test_server_counts_rounds_and_contributions_of_a_job(tmp_path: Path) -> None:
    broker = MemoryBroker()
    settings = Settings(prefix="t", workspace=tmp_path / "ws", heartbeat_s=0.1, client_timeout_s=3.0,
                        schedule_timeout_s=10.0, chunk_timeout_s=5.0, rpc_timeout_s=5.0)
    probe = Probe(broker, settings)
    with ExitStack() as stack:
        stack.enter_context(running(broker, lambda b: PersistorService(settings, b),
                                    service_bus(broker, settings, "persistor")))
        stack.enter_context(running(broker, lambda b: AggregatorService(settings, b, grace_s=1.0),
                                    service_bus(broker, settings, "aggregator")))
        for name in ("site-1", "site-2"):
            site = settings.with_site(name)
            stack.enter_context(running(broker, partial(ClientService, site),
                                        service_bus(broker, site, f"client-{name}", service_topology_too=False)))
        server = stack.enter_context(running(broker, lambda b: ServerService(settings, b),
                                             service_bus(broker, settings, "server")))
        assert isinstance(server, ServerService)
        m = server.meter
        assert value(m, "sagmq_round") == -1 and value(m, "sagmq_phase", phase="idle") == 1
        probe.wait(lambda: value(m, "sagmq_sites_alive") == 2 or None, "both sites alive")

        req = AdminRequest("submit", files=read_job_folder(example_job("hello-numpy-sag")))
        reply = probe.bus.rpc(probe.names.admin, RK_ADMIN_SERVER, req, 5.0).message(AdminReply, LIMIT)
        job = str(reply.result["job_id"])
        ended = probe.first(JobEvent, lambda e: e.job_id == job and e.status not in ("submitted", "running"),
                            timeout=20.0)
        assert ended.status == FINISHED, ended.reason

        got = samples(m)
        assert got[("sagmq_rounds_started_total", ())] == 3
        assert got[("sagmq_rounds_finished_total", ())] == 3
        assert got[("sagmq_round_seconds_count", ())] == 3
        assert 0 < got[("sagmq_round_seconds_sum", ())] < 30
        assert got[("sagmq_round_seconds_bucket", (("le", "+Inf"),))] == 3
        assert got[("sagmq_contributions_total", (("reason", ""), ("result", "accepted")))] == 6
        assert got[("sagmq_round", ())] == -1
        assert got[("sagmq_phase", (("phase", "done"),))] == 1
        assert sum(v for (name, _), v in got.items() if name == "sagmq_phase") == 1
        assert got[("sagmq_job_info", (("job_id", job),))] == 1
        assert got[("sagmq_sites_alive", ())] == 2
        seen = {dict(labels)["site"] for name, labels in got if name == "sagmq_site_last_seen_timestamp_seconds"}
        assert seen == {"site-1", "site-2"}


@dataclass
class FakeRejection:
    reason: str


@dataclass
class FakeRecord:
    round: int
    task_id: str
    started_at: float = 0.0
    accepted: list[str] = field(default_factory=list)
    rejected: list[FakeRejection] = field(default_factory=list)
    aggregated: list[str] | None = None
    seconds: float | None = None


@dataclass
class FakeConfig:
    train_timeout: float = 0.0


@dataclass
class FakeRounds:
    job_id: str
    phase: str = "loading"
    record: FakeRecord | None = None
    history: list[FakeRecord] = field(default_factory=list)
    sag: FakeConfig = field(default_factory=FakeConfig)


def finished(r: int, accepted: list[str], rejected: list[str] = (), seconds: float = 1.0) -> FakeRecord:  # type: ignore[assignment]
    return FakeRecord(r, f"task-{r}", 0.0, accepted, [FakeRejection(x) for x in rejected], accepted, seconds)


def test_rounds_of_a_resumed_job_count_only_what_ran_here() -> None:
    """A server restarted mid-job gets the earlier rounds' records: they are not counted again; an
    aborted round (never aggregated) is started but not finished; rejections count by reason."""
    m = Meter("server")
    view = FakeRounds("job-1", history=[finished(0, ["a", "b"]), finished(1, ["a", "b"])])
    m.follow(view)
    view.history = [finished(0, ["a", "b"]), finished(1, ["a", "b"]), finished(2, ["a", "b"])]  # from the persistor
    view.phase = "training"
    view.record = FakeRecord(3, "task-3", started_at=1.0)
    view.sag = FakeConfig(train_timeout=30)
    m.follow(view)
    m.follow(view)  # nothing new: nothing counted twice
    assert value(m, "sagmq_rounds_started_total") == 1 and value(m, "sagmq_round") == 3
    assert value(m, "sagmq_round_open_seconds") > 1e9  # (the open round started at 1.0, Unix time)
    assert value(m, "sagmq_round_timeout_seconds") == 30
    assert value(m, "sagmq_phase", phase="training") == 1
    view.record = None
    view.history.append(finished(3, ["a"], ["site b returned rc EXECUTION_EXCEPTION: x"], seconds=0.3))
    view.phase = "aggregating"
    m.follow(view)
    view.record = FakeRecord(4, "task-4")
    m.follow(view)
    view.record, view.phase = None, "done"
    # the job fails: the open round is recorded, never aggregated; its verdicts so far count
    view.history.append(FakeRecord(4, "task-4", rejected=[FakeRejection("variable 'w' holds NaN or Inf")]))
    m.follow(view)
    full, view.history = view.history, view.history[:2]  # replaced by a shorter copy, then the whole again:
    m.follow(view)
    view.history = full
    m.follow(view)  # nothing counts twice
    assert value(m, "sagmq_rounds_started_total") == 2
    assert value(m, "sagmq_rounds_finished_total") == 1
    assert value(m, "sagmq_contributions_total", result="rejected", reason="not_finite") == 1
    assert value(m, "sagmq_round_seconds_bucket", le="0.25") == 0
    assert value(m, "sagmq_round_seconds_bucket", le="0.5") == 1
    assert value(m, "sagmq_contributions_total", result="accepted", reason="") == 1
    assert value(m, "sagmq_contributions_total", result="rejected", reason="site_error") == 1
    assert value(m, "sagmq_round") == -1 and value(m, "sagmq_round_open_seconds") == 0
    m.follow(FakeRounds("job-2", record=FakeRecord(0, "task-0"), phase="training"))  # the next job
    assert value(m, "sagmq_rounds_started_total") == 3 and value(m, "sagmq_job_info", job_id="job-2") == 1


# --- the endpoint and its setting --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def endpoint_meter() -> Iterator[tuple[Meter, int]]:
    m = Meter("persistor")
    port = free_port()
    ep = serve_metrics(m, port, "127.0.0.1")
    assert ep is not None and ep.port == port
    try:
        yield m, port
    finally:
        ep.close()


def test_endpoint_serves_the_meter_over_http(endpoint_meter: tuple[Meter, int]) -> None:
    m, port = endpoint_meter
    m.count_sent("model.saved", 42)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'sagmq_bytes_total{direction="sent",kind="model.saved"} 42.0' in text
    assert f'sagmq_service_info{{service="persistor",site="",version="{version()}"}} 1.0' in text
    assert "process_resident_memory_bytes" in text


def test_endpoint_on_a_taken_port_is_a_config_error(endpoint_meter: tuple[Meter, int]) -> None:
    _, port = endpoint_meter
    with pytest.raises(ConfigError, match=f"SAGMQ_METRICS_PORT={port}: cannot serve metrics"):
        serve_metrics(Meter("x"), port, "127.0.0.1")


def test_endpoint_is_off_with_port_zero_and_closes() -> None:
    assert serve_metrics(Meter("x"), 0) is None
    port = free_port()
    ep = serve_metrics(Meter("x"), port, "127.0.0.1")
    assert ep is not None
    ep.close()
    again = serve_metrics(Meter("x"), port, "127.0.0.1")  # the port is free again
    assert again is not None
    again.close()


def test_metrics_port_setting() -> None:
    assert load_settings({}).metrics_port == 0
    assert load_settings({"SAGMQ_METRICS_PORT": "9464"}).metrics_port == 9464
    for bad in ("-1", "65536", "x", "1.5"):
        with pytest.raises(ConfigError, match="SAGMQ_METRICS_PORT"):
            load_settings({"SAGMQ_METRICS_PORT": bad})


# --- the alert rules ---------------------------------------------------------------------------------------


def sagmq_names() -> set[str]:
    """Every sample name a fully fed server meter exports."""
    m = Meter("server")
    m.follow(FakeRounds("j", record=FakeRecord(0, "t")))
    m.watch_sites(lambda: {"site-1": 0.0}, 10.0)
    return {name for name, _ in samples(m)}


def broker_names() -> set[str]:
    """The sample names of the families RabbitMQ 3.10's plugin exports (captured from a live broker)."""
    out = set()
    for line in BROKER_NAMES.read_text().splitlines():
        if line and not line.startswith("#"):
            _, name, kind = line.split()
            out.add(name)
            if kind == "histogram":
                out |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "summary":
                out |= {f"{name}_sum", f"{name}_count"}
    return out


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: strings, label matchers, ranges, grouping label lists
    and function calls taken out."""
    e = re.sub(r'"(\\.|[^"\\])*"|`[^`]*`', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        rest = e[m.end():].lstrip()
        if m.group() in PROMQL_WORDS or rest.startswith("(") or re.match(r"\d", m.group()):
            continue
        names.add(m.group())
    return names


def alert_rules() -> list[dict[str, object]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_the_name_reader_finds_metric_names() -> None:
    assert metric_names('max by (vhost, queue) (a_b{queue=~".+\\\\.results"}) == 0 or c') == {"a_b", "c"}
    assert metric_names("time() - x_seconds > 60") == {"x_seconds"}
    assert metric_names("increase(y_total[10m]) > 0 and on (instance) z") == {"y_total", "z"}


def test_alert_rules_use_only_metrics_that_exist() -> None:
    known = sagmq_names() | broker_names()
    rules = alert_rules()
    assert len(rules) >= 4
    for rule in rules:
        names = metric_names(str(rule["expr"]))
        assert names, rule["alert"]
        assert names <= known, f"{rule['alert']} reads unknown metrics {sorted(names - known)}"


def test_alert_rules_cover_the_issue_and_are_well_formed() -> None:
    rules = {str(r["alert"]): r for r in alert_rules()}
    reads = {a: metric_names(str(r["expr"])) for a, r in rules.items()}
    assert {"rabbitmq_queue_consumers", "rabbitmq_detailed_queue_consumers"} <= reads["SagmqResultsQueueWithoutConsumer"]
    assert ".results" in str(rules["SagmqResultsQueueWithoutConsumer"]["expr"])
    assert {"rabbitmq_queue_messages", "rabbitmq_detailed_queue_messages"} <= reads["SagmqDeadLetters"]
    assert ".dead" in str(rules["SagmqDeadLetters"]["expr"])
    assert reads["SagmqSiteSilent"] == {"sagmq_site_last_seen_timestamp_seconds"}
    assert reads["SagmqRoundOverTimeout"] == {"sagmq_round_open_seconds", "sagmq_round_timeout_seconds"}
    for name, r in rules.items():
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, name
        assert r["labels"]["severity"] in ("critical", "warning", "info"), name  # type: ignore[index]
        assert r["annotations"]["summary"] and r["annotations"]["description"], name  # type: ignore[index]
        assert re.fullmatch(r"\d+[smh]", str(r.get("for", "0m"))), name
    # the promtool unit test beside the fixture (promtool test rules) has a case for every alert
    promtool = yaml.safe_load(PROMTOOL_TEST.read_text())
    cases = {c["alertname"] for t in promtool["tests"] for c in t["alert_rule_test"]}
    assert cases == set(rules)
