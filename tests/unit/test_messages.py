"""Every message type round trips through encode/decode; decode checks every field."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np
import pytest

from sagmq.wire.codec import DXO, WEIGHT_DIFF, WEIGHTS, pack
from sagmq.wire.errors import DecodeError
from sagmq.wire.messages import (
    ALL_MESSAGES,
    BY_TYPE,
    RC_EXECUTION_EXCEPTION,
    RC_OK,
    AdminReply,
    AdminRequest,
    ClientHeartbeat,
    Contribution,
    Control,
    CrossValSave,
    JobEvent,
    Message,
    ModelCommit,
    ModelLoad,
    ModelLoaded,
    ModelSave,
    ModelSaved,
    RoundAggregated,
    RoundClose,
    RoundOpen,
    TaskResult,
    TrainTask,
    decode,
    from_wire,
)

LIMIT = 64 * 2**20


def model() -> DXO:
    return DXO(
        WEIGHTS,
        {"numpy_key": np.arange(9, dtype=np.float32).reshape(3, 3), "bias": np.array([1, -2], dtype=np.int64)},
        {"NUM_STEPS_CURRENT_ROUND": 2, "note": "x"},
    )


SAMPLES: list[Message] = [
    TrainTask(
        job_id="j1", round=2, num_rounds=5, start_round=0, task_name="train", task_id="t-2",
        targets=["site-1", "site-2"], dxo=model(), deploy_map={"app": ["@ALL"]},
        apps={"app": {"config/config_fed_client.json": b"{}", "custom/x.py": b"\x00\xff"}},
    ),
    TaskResult(job_id="j1", round=2, task_name="train", task_id="t-2", site="site-1", rc=RC_OK, dxo=model()),
    TaskResult(job_id="j1", round=2, task_name="train", task_id="t-2", site="site-2", rc=RC_EXECUTION_EXCEPTION,
               dxo=None, error="boom"),
    RoundOpen(
        job_id="j1", round=2, task_id="t-2", targets=["site-1"], expected_data_kind=WEIGHT_DIFF,
        aggregation_weights={"site-1": 0.5}, var_dtypes={"w": "<f4"}, var_shapes={"w": [3, 3], "s": []},
        exclude_vars="^bias", weigh_by_local_iter=False,
    ),
    RoundOpen(job_id="j1", round=3, task_id="t-3", targets=["site-1"], expected_data_kind=WEIGHTS,
              aggregation_weights={}, var_dtypes={"w": "<f4"}, var_shapes={"w": [3]}, persist=True),
    RoundClose(job_id="j1", round=2, reason="all 2 targets answered"),
    Contribution(job_id="j1", round=2, site="site-1", accepted=False, rc=RC_OK, reason="duplicate"),
    RoundAggregated(job_id="j1", round=2, accepted=["site-1", "site-2"], dxo=model()),
    RoundAggregated(job_id="j1", round=3, accepted=[], dxo=None),
    RoundAggregated(job_id="j1", round=4, accepted=["site-2"], dxo=model(), task_id="t-4"),
    ModelLoad(job_id="j1", model_dir="m", model_name="x.npy", initial=[[1.0, 2.0], [3.0, 4.5]]),
    ModelLoad(job_id="j2"),
    ModelLoaded(job_id="j1", source="initial", dxo=model(), next_round=3),
    ModelSave(job_id="j1", round=2, dxo=model(), model_dir="m", model_name="x.npy",
              history=[{"round": 0, "accepted": ["site-1"], "close_reason": "all", "t": 1.5}]),
    ModelCommit(job_id="j1", round=2, task_id="t-2", model_dir="m", model_name="x.npy", history=[{"round": 2}]),
    ModelSaved(job_id="j1", round=2, path="/ws/jobs/j1/m/x.npy"),
    JobEvent(job_id="j1", name="hello", status="failed", reason="why",
             meta={"min_clients": 2, "deploy_map": {"app": ["@ALL"]}, "x": None, "b": b"\x01"},
             history=[{"round": 1}]),
    ClientHeartbeat(site="site-1", hello=True, host="h", pid=123, allow_custom_code=False, busy_job="j1",
                    busy_round=4),
    CrossValSave(job_id="j1", cross_val_dir="cross_site_val", model_owner="site-1", dxo=model()),
    CrossValSave(job_id="j1", cross_val_dir="cv", results_path="cv/r.json", results={"site-1": {"SRV_server": {"a": 1.5}}}),
    Control(command="abort", job_id="j1", target="site-1"),
    AdminRequest(command="submit", args={"name": "x", "n": 3, "f": 0.5, "l": [1, "a"]},
                 files={"meta.json": b"{}"}),
    AdminReply(ok=True, result={"jobs": [{"id": "j1", "status": "running"}]}, error="", files={"a": b"b"}),
]


def assert_same_value(got: Any, want: Any, where: str) -> None:
    if isinstance(want, DXO):
        assert isinstance(got, DXO), where
        assert got.kind == want.kind, where
        assert dict(got.meta) == dict(want.meta), where
        assert list(got.data) == list(want.data), where
        for k, v in want.data.items():
            assert got.data[k].dtype == v.dtype, f"{where}.data[{k}]"
            assert got.data[k].shape == v.shape, f"{where}.data[{k}]"
            np.testing.assert_array_equal(got.data[k], v)
    else:
        assert got == want, where
        assert type(got) is type(want), where


def test_samples_cover_every_message_type() -> None:
    assert {type(m) for m in SAMPLES} == set(ALL_MESSAGES)
    assert set(BY_TYPE) == {m.TYPE for m in ALL_MESSAGES}
    assert len(BY_TYPE) == len(ALL_MESSAGES)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: f"{m.TYPE}")
def test_every_message_roundtrips(msg: Message) -> None:
    body = msg.encode()
    got = decode(type(msg), body, LIMIT)
    assert type(got) is type(msg)
    for f in dataclasses.fields(msg):  # type: ignore[arg-type]
        assert_same_value(getattr(got, f.name), getattr(msg, f.name), f"{msg.TYPE}.{f.name}")
    assert got.encode() == body


def test_decode_fills_defaults_when_optional_fields_are_absent() -> None:
    body = pack({"job_id": "j", "round": 1, "task_name": "train", "task_id": "t", "site": "s", "rc": "OK"})
    got = decode(TaskResult, body, LIMIT)
    assert got.dxo is None
    assert got.error == ""
    ev = decode(JobEvent, pack({"job_id": "j", "name": "n", "status": "running"}), LIMIT)
    assert ev.meta == {} and ev.history == []


def test_float_field_accepts_an_integer() -> None:
    wire = SAMPLES[3].to_wire()
    wire["aggregation_weights"] = {"site-1": 2}
    got = from_wire(RoundOpen, wire)
    assert got.aggregation_weights == {"site-1": 2.0}
    assert isinstance(got.aggregation_weights["site-1"], float)


# --- refusals --------------------------------------------------------------------------------


def wire_of(cls: type[Message]) -> dict[str, Any]:
    return next(m for m in SAMPLES if type(m) is cls).to_wire()


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.TYPE)
def test_decode_rejects_each_missing_required_field(cls: type[Message]) -> None:
    required = [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in required:
        wire = wire_of(cls)
        del wire[name]
        with pytest.raises(DecodeError) as e:
            decode(cls, pack(wire), LIMIT)
        assert repr(name) in str(e.value)
        assert "missing" in str(e.value)


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.TYPE)
def test_decode_rejects_an_unknown_field(cls: type[Message]) -> None:
    wire = wire_of(cls)
    wire["surprise_field"] = 1
    with pytest.raises(DecodeError, match="surprise_field"):
        decode(cls, pack(wire), LIMIT)


def test_decode_rejects_a_body_that_is_not_a_map() -> None:
    with pytest.raises(DecodeError, match="not a map"):
        decode(RoundClose, pack(["j", 1, "r"]), LIMIT)


@pytest.mark.parametrize(
    ("cls", "field", "value", "where"),
    [
        (TrainTask, "round", "2", "task.round"),
        (TrainTask, "round", True, "task.round"),
        (TrainTask, "round", 2.0, "task.round"),
        (TrainTask, "targets", "site-1", "task.targets"),
        (TrainTask, "targets", ["site-1", 2], "task.targets[1]"),
        (TrainTask, "deploy_map", {"app": "@ALL"}, "task.deploy_map['app']"),
        (TrainTask, "apps", {"app": {"a.py": "text, not bytes"}}, "task.apps['app']['a.py']"),
        (TrainTask, "dxo", None, "task.dxo"),
        (TaskResult, "site", 1, "result.site"),
        (TaskResult, "dxo", {"kind": "WEIGHTS"}, "result.dxo"),
        (RoundOpen, "aggregation_weights", {"site-1": "1"}, "round.open.aggregation_weights['site-1']"),
        (RoundOpen, "aggregation_weights", {"site-1": True}, "round.open.aggregation_weights['site-1']"),
        (RoundOpen, "var_shapes", {"w": [3, "3"]}, "round.open.var_shapes['w'][1]"),
        (RoundOpen, "weigh_by_local_iter", 1, "round.open.weigh_by_local_iter"),
        (Contribution, "accepted", 0, "contribution.accepted"),
        (Contribution, "accepted", "yes", "contribution.accepted"),
        (ClientHeartbeat, "pid", True, "client.heartbeat.pid"),
        (ClientHeartbeat, "pid", 1.5, "client.heartbeat.pid"),
        (ClientHeartbeat, "host", b"h", "client.heartbeat.host"),
        (ClientHeartbeat, "busy_round", None, "client.heartbeat.busy_round"),
        (ModelLoad, "initial", "x", "model.load.initial"),
        (ModelSave, "history", [1], "model.save.history[0]"),
        (JobEvent, "meta", [], "job.meta"),
        (AdminRequest, "files", {"a": 1}, "admin.request.files['a']"),
        (AdminReply, "ok", "true", "admin.reply.ok"),
    ],
)
def test_decode_rejects_wrong_field_type_and_names_the_field(cls: type[Message], field: str, value: Any,
                                                            where: str) -> None:
    wire = wire_of(cls)
    wire[field] = value
    with pytest.raises(DecodeError) as e:
        decode(cls, pack(wire), LIMIT)
    assert where in str(e.value)


def timestamp_body(wire: dict[str, Any]) -> bytes:
    return msgpack.packb(wire, use_bin_type=True, datetime=False)


def test_decode_rejects_timestamp_in_job_meta() -> None:
    wire = wire_of(JobEvent)
    wire["meta"] = {"when": msgpack.Timestamp(1_700_000_000, 0)}
    with pytest.raises(DecodeError, match=r"job\.meta\['when'\]"):
        decode(JobEvent, timestamp_body(wire), LIMIT)


def test_decode_rejects_timestamp_in_admin_args() -> None:
    wire = wire_of(AdminRequest)
    wire["args"] = {"deep": [1, {"t": msgpack.Timestamp(5, 0)}]}
    with pytest.raises(DecodeError, match=r"admin\.request\.args"):
        decode(AdminRequest, timestamp_body(wire), LIMIT)


def test_decode_rejects_timestamp_in_history() -> None:
    wire = wire_of(ModelSave)
    wire["history"] = [{"at": msgpack.Timestamp(5, 0)}]
    with pytest.raises(DecodeError, match=r"model\.save\.history"):
        decode(ModelSave, timestamp_body(wire), LIMIT)


def test_decode_rejects_timestamp_in_dxo_meta() -> None:
    # A DXO's meta is free-form too: it must hold only plain msgpack values.
    wire = wire_of(TaskResult)
    wire["dxo"]["meta"] = {"when": msgpack.Timestamp(1_700_000_000, 0)}
    with pytest.raises(DecodeError):
        decode(TaskResult, timestamp_body(wire), LIMIT)


def test_decode_rejects_ext_type_anywhere() -> None:
    wire = wire_of(RoundClose)
    wire["reason"] = msgpack.ExtType(42, b"x")
    with pytest.raises(DecodeError, match="ext type"):
        decode(RoundClose, msgpack.packb(wire, use_bin_type=True), LIMIT)


def test_decode_rejects_bad_array_inside_a_message_and_names_it() -> None:
    wire = wire_of(ModelLoaded)
    wire["dxo"]["data"]["numpy_key"]["dtype"] = "|O"
    with pytest.raises(DecodeError, match=r"model\.loaded\.dxo\.data\['numpy_key'\]"):
        decode(ModelLoaded, pack(wire), LIMIT)


def test_decode_rejects_oversize_message() -> None:
    body = SAMPLES[0].encode()
    with pytest.raises(DecodeError, match="exceeds"):
        decode(TrainTask, body, len(body) - 1)


def test_decoded_task_arrays_are_read_only() -> None:
    got = decode(TrainTask, SAMPLES[0].encode(), LIMIT)
    assert not got.dxo.data["numpy_key"].flags.writeable
