"""Site names that survive restarts (SAGMQ_SITE=site-{n}, sagmq.amqp.claim), on the real broker."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from sagmq.amqp.claim import SiteClaim
from sagmq.cli.procs import LocalStack, Proc
from sagmq.wire.errors import BrokerRefused, BrokerUnavailable
from sagmq.wire.settings import Settings
from tests.conftest import wait_for

pytestmark = [pytest.mark.broker]


def health_of(ws: Path, site: str) -> dict[str, object] | None:
    try:
        return dict(json.loads((ws / "health" / f"client-{site}.json").read_text()))
    except (OSError, ValueError):
        return None


def site_of(ws: Path, proc: Proc, sites: int = 5) -> str | None:
    """The site name the process claimed, read from its health file."""
    for n in range(1, sites + 1):
        h = health_of(ws, f"site-{n}")
        if h is not None and h["pid"] == proc.popen.pid and h["connected"]:
            return f"site-{n}"
    return None


def test_three_clients_get_distinct_names_and_a_new_one_takes_the_freed_name(settings: Settings,
                                                                              tmp_path: Path) -> None:
    ws = settings.workspace
    stack = LocalStack({"SAGMQ_AMQP_URL": settings.amqp_url, "SAGMQ_PREFIX": settings.prefix,
                        "SAGMQ_WORKSPACE": str(ws), "SAGMQ_SITE": "site-{n}"}, tmp_path / "logs")
    try:
        procs = [stack.start(f"c{i}", "client") for i in range(3)]
        names = [wait_for(lambda p=p: site_of(ws, p), 20, f"{p.name} to claim a name") for p in procs]
        assert sorted(names) == ["site-1", "site-2", "site-3"]
        victim = procs[names.index("site-2")]
        stack.kill(victim)  # SIGKILL: its connection, and the claim with it, goes away
        fresh = stack.start("c3", "client")
        assert wait_for(lambda: site_of(ws, fresh), 20, "the new client to claim a name") == "site-2"
        survivors = [p for p in procs if p is not victim]
        assert sorted(site_of(ws, p) or "" for p in survivors) == ["site-1", "site-3"]
    finally:
        stack.stop_all()
    assert all(p.popen.returncode == 0 for p in stack.procs if p.name != victim.name), \
        "\n".join(p.tail() for p in stack.procs)


def close_connection(name: str) -> None:
    """Close a connection by its connection_name from the broker's side (as a lost network would)."""
    out = subprocess.run(["rabbitmqctl", "-q", "--no-table-headers", "list_connections", "pid", "client_properties"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    pids = [line.split("\t")[0] for line in out.splitlines() if f'{{"connection_name","{name}"}}' in line]
    assert len(pids) == 1, out
    subprocess.run(["rabbitmqctl", "-q", "close_connection", pids[0], "test: connection lost"], check=True,
                   capture_output=True, timeout=30)


def test_a_lost_claim_is_claimed_again(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    who = f"t{uuid.uuid4().hex[:8]}"
    a, b = SiteClaim(settings, who), SiteClaim(settings, f"{who}-b")
    lost = threading.Event()
    try:
        assert a.claim("site-{n}") == "site-1"
        a.watch(lost.set)
        with caplog.at_level("INFO", logger="sagmq.amqp.claim"):
            close_connection(f"sagmq-{who}-claim")
            wait_for(lambda: any("claimed again" in r.getMessage() for r in caplog.records), 15,
                     "the name to be claimed again")
        assert b.claim("site-{n}") == "site-2"
        assert not lost.is_set() and not a.lost
    finally:
        a.close()
        b.close()


def test_a_name_taken_while_the_connection_was_down_stops_the_site(settings: Settings) -> None:
    who = f"t{uuid.uuid4().hex[:8]}"
    a, b = SiteClaim(settings, who), SiteClaim(settings, f"{who}-b")
    lost = threading.Event()
    try:
        assert a.claim("lab-{n}") == "lab-1"
        close_connection(f"sagmq-{who}-claim")
        assert b.claim("lab-{n}") == "lab-1"  # its claim went with the connection
        a.watch(lost.set)
        assert lost.wait(15) and a.lost
    finally:
        a.close()
        b.close()


def test_a_fixed_name_is_claimed_too(settings: Settings) -> None:
    a, b = SiteClaim(settings, "ta"), SiteClaim(replace(settings), "tb")
    try:
        assert a.claim("site-7") == "site-7"
        with pytest.raises(BrokerRefused, match="no free site name"):
            b.claim("site-7")
    finally:
        a.close()
        b.close()


def test_a_claim_waits_for_a_broker_then_gives_up_and_refused_credentials_fail_at_once(settings: Settings) -> None:
    down = SiteClaim(replace(settings, amqp_url="amqp://guest:guest@127.0.0.1:1/%2F"), "td", connect_timeout_s=2)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        down.claim("site-{n}")
    assert 1.5 < time.monotonic() - started < 15  # retried like the bus's own connect, for its timeout
    refused = SiteClaim(replace(settings, amqp_url=settings.amqp_url.replace("guest:guest@", "guest:wrong@")), "tr",
                        connect_timeout_s=30)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="refused"):
        refused.claim("site-{n}")
    assert time.monotonic() - started < 5  # not retried
