"""Many sites in one process: `--sites` parsing, site patterns, process groups, the shared worker pool."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sagmq.cli.bench import expected_model
from sagmq.cli.floor import floor_groups
from sagmq.cli.procs import group_spec, site_groups
from sagmq.client.multisite import SHARE_MIN_BYTES, MultiSite, SerialPool, parse_sites
from sagmq.memory import MemoryBroker, MemoryBus
from sagmq.wire.bus import Delivery
from sagmq.wire.codec import DXO, WEIGHTS
from sagmq.wire.errors import ConfigError, DecodeError
from sagmq.wire.messages import TrainTask
from sagmq.wire.settings import Settings, parse_simulation_users, site_matches, site_range


def test_a_range_names_every_site_in_order() -> None:
    assert parse_sites("site-1..site-5") == ["site-1", "site-2", "site-3", "site-4", "site-5"]
    assert parse_sites("s7..s7") == ["s7"]
    assert len(parse_sites("site-1..site-500")) == 500


def test_a_count_uses_the_prefix() -> None:
    assert parse_sites("3") == ["site-1", "site-2", "site-3"]
    assert parse_sites("2", prefix="sim.") == ["sim.1", "sim.2"]


def test_lists_mix_names_and_ranges() -> None:
    assert parse_sites("a, b-1..b-2 ,c") == ["a", "b-1", "b-2", "c"]


def test_the_second_end_may_leave_out_the_prefix() -> None:
    assert parse_sites("site-9..11") == ["site-9", "site-10", "site-11"]


@pytest.mark.parametrize(("spec", "why"), [
    ("0", "N >= 1"),
    ("site-5..site-1", "larger than the last"),
    ("site-1..node-3", "same prefix"),
    ("a,a", "twice"),
    ("site-1..site-3,site-2", "twice"),
    ("bad name", "not a valid name"),
    (",", "names no site"),
    ("s1..s1000000", "more than"),
])
def test_bad_specs_are_refused_with_a_reason(spec: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_sites(spec)


def test_site_range_and_matching() -> None:
    assert site_range("site-1..site-500") == ("site-", 1, 500)
    assert site_range("site-1") is None
    assert site_matches("site-1..site-500", "site-500")
    assert not site_matches("site-1..site-500", "site-501")
    assert not site_matches("site-1..site-500", "site-0")
    assert not site_matches("site-1..site-500", "site-01")  # a number is written one way only
    assert not site_matches("site-1..site-500", "site-")
    assert not site_matches("site-1..site-500", "xsite-5")
    assert site_matches("lab-*", "lab-7") and not site_matches("lab-*", "Lab-7")
    assert site_matches("exact", "exact") and not site_matches("exact", "exactly")


def test_simulation_users_decide_who_speaks_for_whom() -> None:
    s = replace(Settings(amqp_url="amqp://server:x@h/%2F"),
                simulation_users=parse_simulation_users("sim=site-1..site-3,lab-*; other=x"))
    assert s.may_speak_for("site-9", "site-9")  # a provisioned site: its own user
    assert s.may_speak_for("server", "site-9")  # the service's own user (a one-user deployment)
    assert s.may_speak_for("sim", "site-3") and s.may_speak_for("sim", "lab-x")
    assert not s.may_speak_for("sim", "site-4")
    assert not s.may_speak_for("other", "site-1")
    assert not s.may_speak_for(None, "site-1") and not s.may_speak_for("", "")
    assert not Settings(amqp_url="amqp://server:x@h/%2F").may_speak_for("sim", "site-1")  # the default


@pytest.mark.parametrize("raw", ["sim", "=site-1", "sim=", "sim=site-3..site-1"])
def test_bad_simulation_users_fail_at_start(raw: str) -> None:
    with pytest.raises(ConfigError):
        parse_simulation_users(raw)


def test_site_groups_one_process_each_up_to_eight_then_a_few() -> None:
    eight = parse_sites("8")
    assert site_groups(eight) == [[s] for s in eight]
    groups = site_groups(parse_sites("1000"))
    assert len(groups) == 4 and [len(g) for g in groups] == [250] * 4
    assert [s for g in groups for s in g] == parse_sites("1000")
    assert len(site_groups(parse_sites("9"))) == 2  # both cores
    assert [group_spec(g) for g in groups][:2] == ["site-1..site-250", "site-251..site-500"]
    assert group_spec(["a", "b"]) == "a,b" and group_spec(["s-1", "s-3"]) == "s-1,s-3"
    assert parse_sites(group_spec(["s-1", "s-3"])) == ["s-1", "s-3"]


def test_the_pool_runs_each_site_in_order_and_one_at_a_time() -> None:
    pool = SerialPool(3)
    pool.start()
    lock = threading.Lock()
    running: dict[str, int] = {}
    overlap: list[str] = []
    order: dict[str, list[int]] = {}
    done = threading.Semaphore(0)

    def job(site: str, i: int) -> None:
        with lock:
            running[site] = running.get(site, 0) + 1
            if running[site] > 1:
                overlap.append(site)
        time.sleep(0.001)
        with lock:
            running[site] -= 1
            order.setdefault(site, []).append(i)
        done.release()

    for i in range(20):
        for site in ("a", "b", "c", "d"):
            pool.submit(site, lambda s=site, i=i: job(s, i))  # type: ignore[misc]
    for _ in range(80):
        assert done.acquire(timeout=10)
    pool.close()
    assert overlap == []
    assert order == {s: list(range(20)) for s in "abcd"}
    assert not any(t.is_alive() for t in pool.threads)


def test_a_failing_work_item_does_not_stop_the_pool() -> None:
    pool = SerialPool(1)
    pool.start()
    ran = threading.Event()

    def boom() -> None:
        raise RuntimeError("bug")

    pool.submit("a", boom)
    pool.submit("a", ran.set)
    assert ran.wait(5)
    pool.close()


def test_the_bench_expects_nvflare_arithmetic_bit_for_bit() -> None:
    base = (np.arange(9) % 1000).astype(np.float32)
    np.testing.assert_array_equal(expected_model(base, 8, 3), base + 3)  # 1/8 is exact
    at_1000 = expected_model(base, 1000, 5)
    assert not np.array_equal(at_1000, base + 5)  # 1/1000 is not: the bench must not expect base + 5
    v = base + np.float32(1)  # one round by hand: 1000 identical float32 adds, then * float32(1/1000)
    acc = np.zeros_like(v)
    for _ in range(1000):
        acc += v
    np.testing.assert_array_equal(expected_model(base, 1000, 1), acc * np.float32(1 / 1000))
    assert expected_model(base.astype(np.float64), 3, 2).dtype == np.float64


def test_the_floor_uses_as_many_processes_as_the_sites() -> None:
    assert floor_groups(2) == [[0], [1]]
    assert [len(g) for g in floor_groups(1000)] == [len(g) for g in site_groups(parse_sites("1000"))]


def _delivery(body: bytes, message_id: str = "m-1") -> Delivery:
    return Delivery("q", "x", "k", "task", {}, "guest", message_id, None, None, False, body, 1, 1)


def _task_body(value: float, n: int = 64 * 1024) -> bytes:
    dxo = DXO(WEIGHTS, {"numpy_key": np.full(n, value, np.float32)}, {})
    return TrainTask("j", 0, 1, 0, "train", "t-0", ["s-1", "s-2"], dxo, {}, {}).encode()


def test_sites_of_one_process_share_one_copy_of_a_body_decoded_once(tmp_path: Path) -> None:
    settings = Settings(prefix="t", workspace=tmp_path)
    ms = MultiSite(settings, MemoryBus(MemoryBroker(), settings, "sims"), ["s-1", "s-2"], 1)
    big = _task_body(1.0)  # 256 kB of weights
    first, again = _delivery(big), _delivery(bytes(bytearray(big)))
    assert first.body is not again.body
    ms.sites[0].intake(first)  # type: ignore[misc]
    ms.sites[1].intake(again)  # type: ignore[misc]
    assert again.body is first.body and again.payload is first.payload
    a1 = first.message(TrainTask, settings.max_body_bytes).dxo.data["numpy_key"]
    a2 = again.message(TrainTask, settings.max_body_bytes).dxo.data["numpy_key"]
    assert np.shares_memory(a1, a2) and not a1.flags.writeable  # one model for both sites, read-only
    np.testing.assert_array_equal(a2, np.full(64 * 1024, 1.0, np.float32))
    other = _delivery(_task_body(2.0))  # the same id with other bytes: not shared (never trust the id alone)
    ms.share(other)
    assert other.body is not first.body and other.payload is not first.payload
    np.testing.assert_array_equal(other.message(TrainTask, settings.max_body_bytes).dxo.data["numpy_key"], 2.0)
    small, small2 = _delivery(b"x" * 100, "m-2"), _delivery(bytes(bytearray(b"x" * 100)), "m-2")
    ms.share(small)
    ms.share(small2)
    assert small2.body is not small.body and small.payload is None  # not worth it below SHARE_MIN_BYTES
    for i in range(10):
        ms.share(_delivery(big, f"n-{i}"))
    assert len(ms._bodies) == 4  # a few bodies kept, not one per message
    with pytest.raises(DecodeError):  # a large body that is not msgpack: refused here, as decoding would
        ms.share(_delivery(b"\xc1" * SHARE_MIN_BYTES, "junk"))
    assert "junk" not in ms._bodies


def test_the_pool_waits_for_room_before_starting_work() -> None:
    room = threading.Event()
    pool = SerialPool(1, room.is_set)
    pool.start()
    ran = threading.Event()
    pool.submit("a", ran.set)
    assert not ran.wait(0.2)  # no room: a result of the process still waits for its confirm
    room.set()
    assert ran.wait(5)
    pool.close()
