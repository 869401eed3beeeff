"""Every message sagmq sends, as frozen dataclasses, with symmetric wire conversion.

Each class has a ``TYPE`` (the AMQP ``type`` property and the schema file name under
schemas/). ``to_wire`` gives a msgpack-ready map; ``from_wire`` checks every field
against the class's type hints and raises DecodeError naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from sagmq.wire.blob import array_bytes
from sagmq.wire.codec import DXO, check_plain, decode_dxo, encode_dxo, pack, unpack
from sagmq.wire.errors import DecodeError

SCHEMA_VERSION = "1"

# NVFlare ReturnCode values that sagmq uses.
RC_OK = "OK"
RC_EXECUTION_EXCEPTION = "EXECUTION_EXCEPTION"
RC_TASK_UNKNOWN = "TASK_UNKNOWN"
RC_BAD_TASK_DATA = "BAD_TASK_DATA"
RC_TASK_ABORTED = "TASK_ABORTED"
RC_UNSAFE_JOB = "UNSAFE_JOB"
RC_EXECUTION_RESULT_ERROR = "EXECUTION_RESULT_ERROR"

# TrainTask.result_to: the site sends its result to the server, not the aggregator
RESULT_TO_SERVER = "server"

# Job statuses.
SUBMITTED = "submitted"
RUNNING = "running"
FINISHED = "finished"
FAILED = "failed"
ABORTED = "aborted"
JOB_STATUSES = (SUBMITTED, RUNNING, FINISHED, FAILED, ABORTED)

Files = dict[str, bytes]


class Message:
    """Base of every message type."""

    TYPE: ClassVar[str] = ""
    # every concrete message is a dataclass; declared so the type checker knows it (as typeshed's
    # DataclassInstance does), and dataclasses.fields() accepts a type[Message]
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-ready map of this message (only fields that can hold a DXO are walked)."""
        out: dict[str, Any] = {}
        for name, _, _, walk in _fields(type(self)):
            v = getattr(self, name)
            out[name] = _to_wire(v) if walk else list(v) if isinstance(v, tuple) else v
        return out

    def encode(self) -> bytes:
        """msgpack bytes of this message."""
        return pack(self.to_wire())


M = TypeVar("M", bound=Message)


def _to_wire(v: Any) -> Any:
    if isinstance(v, DXO):
        return encode_dxo(v)
    if isinstance(v, Mapping):
        return {k: _to_wire(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_to_wire(x) for x in v]
    return v


def _check(v: Any, tp: Any, where: str) -> Any:
    """v, checked against the field type tp (and converted where the wire is looser: int to float)."""
    if tp is Any:
        return check_plain(v, where)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _check_union(v, tp, where)
    if tp is DXO:
        return decode_dxo(v, where)
    if origin is list:
        return _check_list(v, tp, where)
    if origin is dict:
        return _check_dict(v, tp, where)
    return _check_scalar(v, tp, where)


def _check_union(v: Any, tp: Any, where: str) -> Any:
    errors = []
    for alt in typing.get_args(tp):
        if alt is type(None):
            if v is None:
                return None
            continue
        try:
            return _check(v, alt, where)
        except DecodeError as e:
            errors.append(str(e))
    raise DecodeError(errors[0] if errors else f"{where}: must be null")


def _check_list(v: Any, tp: Any, where: str) -> list[Any]:
    (item,) = typing.get_args(tp)
    if not isinstance(v, list):
        raise DecodeError(f"{where}: expected a list, got {type(v).__name__}")
    if item is str and all(type(x) is str for x in v):  # a round's 1000 site names: one quick pass, not 1000 checks
        return v
    return [_check(x, item, f"{where}[{i}]") for i, x in enumerate(v)]


def _check_dict(v: Any, tp: Any, where: str) -> dict[Any, Any]:
    kt, vt = typing.get_args(tp)
    if not isinstance(v, Mapping):
        raise DecodeError(f"{where}: expected a map, got {type(v).__name__}")
    return {_check(k, kt, f"{where} key"): _check(x, vt, f"{where}[{k!r}]") for k, x in v.items()}


def _check_scalar(v: Any, tp: Any, where: str) -> Any:
    # bool is a subclass of int in Python but a type of its own on the wire
    if tp is float:
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
        raise DecodeError(f"{where}: expected a number, got {type(v).__name__}")
    if tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        raise DecodeError(f"{where}: expected an integer, got {type(v).__name__}")
    if tp in (str, bool, bytes):
        if isinstance(v, tp) and not (tp is not bool and isinstance(v, bool)):
            return v
        raise DecodeError(f"{where}: expected {tp.__name__}, got {type(v).__name__}")
    raise TypeError(f"unsupported wire type {tp!r} at {where}")  # a bug in a message class


def _holds(tp: Any, kinds: tuple[type, ...]) -> bool:
    return tp in kinds or any(_holds(a, kinds) for a in typing.get_args(tp))


# (name, type, optional, holds a DXO) of a message field
_Field = tuple[str, Any, bool, bool]
# per message class, resolved once (a dict, not functools.cache: mypy cannot see that a class object
# is hashable when its instances define __hash__)
_FIELDS: dict[type[Message], tuple[_Field, ...]] = {}
_BULKY: dict[type[Message], tuple[str, ...]] = {}


def _fields(cls: type[Message]) -> tuple[_Field, ...]:
    """(name, type, optional, holds a DXO) of each field of a message class, resolved once."""
    found = _FIELDS.get(cls)
    if found is None:
        hints = typing.get_type_hints(cls)
        found = _FIELDS[cls] = tuple(
            (f.name, hints[f.name],
             f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING,
             _holds(hints[f.name], (DXO,)))
            for f in dataclasses.fields(cls))
    return found


def _bulky(cls: type[Message]) -> tuple[str, ...]:
    """The fields of a message class that can carry arrays or large binaries."""
    found = _BULKY.get(cls)
    if found is None:
        hints = typing.get_type_hints(cls)
        found = _BULKY[cls] = tuple(f.name for f in dataclasses.fields(cls) if _holds(hints[f.name], (DXO, bytes)))
    return found


def bulk_bytes(msg: Message, wire: dict[str, Any]) -> int:
    """Bytes of array data and large binaries in a message's wire map (to decide whether it goes in
    parts), looking only at the fields that can carry them (not, say, a long round history)."""
    return sum(array_bytes(wire[name]) for name in _bulky(type(msg)))


def from_wire(cls: type[M], obj: Any) -> M:
    """Build a message of class cls from a decoded map, checking every field."""
    if not isinstance(obj, Mapping):
        raise DecodeError(f"{cls.TYPE}: body is not a map")
    kwargs: dict[str, Any] = {}
    names = set()
    for name, tp, optional, _ in _fields(cls):
        names.add(name)
        if name not in obj:
            if optional:
                continue
            raise DecodeError(f"{cls.TYPE}: field {name!r} is missing")
        kwargs[name] = _check(obj[name], tp, f"{cls.TYPE}.{name}")
    unknown = set(obj) - names
    if unknown:
        raise DecodeError(f"{cls.TYPE}: unknown fields {sorted(unknown)}")
    return cls(**kwargs)


def decode(cls: type[M], body: bytes, max_bytes: int) -> M:
    """Bytes to a message of class cls, or DecodeError."""
    return from_wire(cls, unpack(body, max_bytes))


# --- scatter and gather -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrainTask(Message):
    """The server's task for one round, published once and fanned out to the targets."""

    TYPE: ClassVar[str] = "task"
    job_id: str
    round: int
    num_rounds: int
    start_round: int
    task_name: str
    task_id: str
    targets: list[str]
    dxo: DXO
    deploy_map: dict[str, list[str]]
    apps: dict[str, Files]
    # non-empty: dxo.data is empty and the model is the aggregate of the task with this id, which the
    # aggregator forwarded to the site's queue (a site that lacks it asks for the whole task)
    model_from: str = ""
    # where the site sends its result: "" to the aggregator (a training round), RESULT_TO_SERVER to the
    # server (cross-site evaluation's submit_model and validate tasks)
    result_to: str = ""


@dataclass(frozen=True, slots=True)
class TaskResult(Message):
    """A site's answer to a task: a DXO when rc is OK, else an error text."""

    TYPE: ClassVar[str] = "result"
    job_id: str
    round: int
    task_name: str
    task_id: str
    site: str
    rc: str
    dxo: DXO | None = None
    error: str = ""


@dataclass(frozen=True, slots=True)
class RoundOpen(Message):
    """Tells the aggregator a round started, with its aggregator settings."""

    TYPE: ClassVar[str] = "round.open"
    job_id: str
    round: int
    task_id: str
    targets: list[str]
    expected_data_kind: str
    aggregation_weights: dict[str, float]
    var_dtypes: dict[str, str]
    var_shapes: dict[str, list[int]]
    exclude_vars: str = ""
    weigh_by_local_iter: bool = True
    persist: bool = False  # route the aggregate to the persistor too: it becomes the saved model
    forward: bool = False  # route the aggregate to the accepted sites too: it is their next model
    # the task of an earlier round whose aggregate this round was built on and the server did not
    # commit: its opening commits it (the aggregate carries this on to the persistor)
    commits: str = ""
    # the server's task_result_filters, run on each result before it is accumulated: [{tasks, path, args}]
    result_filters: list[dict[str, Any]] = field(default_factory=list)
    # NVFlare's collection mode (expected_data_kind is then COLLECTION): per key of the result's COLLECTION,
    # its expected kind, aggregation weights and exclude_vars, each resolved (a value given once is per key)
    collection_kinds: dict[str, str] = field(default_factory=dict)
    collection_weights: dict[str, dict[str, float]] = field(default_factory=dict)
    collection_exclude_vars: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RoundClose(Message):
    """Tells the aggregator to finish a round and publish the aggregate."""

    TYPE: ClassVar[str] = "round.close"
    job_id: str
    round: int
    reason: str
    expected: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Contribution(Message):
    """The aggregator's verdict on one result (accepted or rejected with a reason)."""

    TYPE: ClassVar[str] = "contribution"
    job_id: str
    round: int
    site: str
    accepted: bool
    rc: str
    reason: str = ""
    task_id: str = ""


@dataclass(frozen=True, slots=True)
class RoundAggregated(Message):
    """The aggregate of a closed round (None when no contribution was accepted)."""

    TYPE: ClassVar[str] = "round.aggregated"
    job_id: str
    round: int
    accepted: list[str]
    dxo: DXO | None = None
    task_id: str = ""
    commits: str = ""  # from round.open: the persistor saves the held aggregate of that task
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> what its result reported


MAX_METRICS = 32  # numbers kept of one result's meta; a longer name than MAX_METRIC_NAME is dropped
MAX_METRIC_NAME = 64
INITIAL_METRICS = "initial_metrics"  # NVFlare's MetaKey.INITIAL_METRICS: the site's metric of the model it got


def reported_metrics(meta: Mapping[str, Any] | None) -> dict[str, float]:
    """The numbers a result's DXO meta reports: its ``metrics`` map ({name: number}) and NVFlare's
    ``initial_metrics`` (one number); finite numbers only, at most MAX_METRICS short names."""
    if not isinstance(meta, Mapping):
        return {}
    found = dict(meta["metrics"]) if isinstance(meta.get("metrics"), Mapping) else {}
    if INITIAL_METRICS in meta:
        found[INITIAL_METRICS] = meta[INITIAL_METRICS]
    out: dict[str, float] = {}
    for k, v in found.items():
        if (isinstance(k, str) and len(k) <= MAX_METRIC_NAME and isinstance(v, int | float) and not isinstance(v, bool)
                and math.isfinite(v) and len(out) < MAX_METRICS):
            out[k] = float(v)
    return out


# --- persistence ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelLoad(Message):
    """Asks the persistor for a job's starting model."""

    TYPE: ClassVar[str] = "model.load"
    job_id: str
    model_dir: str = "models"
    model_name: str = "server.npy"
    initial: list[Any] | None = None
    source: str = ""
    # ScatterAndGather's snapshot_every_n_rounds: a resumed job restarts after the last saved round r with
    # (r + 1) % n == 0 (0: never resumed, it starts over)
    snapshot_every_n_rounds: int = 1


@dataclass(frozen=True, slots=True)
class ModelLoaded(Message):
    """The persistor's answer to model.load; next_round > start means a resumed job, and history then
    carries the round records the persistor holds (the server fills the rounds its own copy lacks)."""

    TYPE: ClassVar[str] = "model.loaded"
    job_id: str
    source: str
    dxo: DXO | None
    next_round: int = -1
    error: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ModelSave(Message):
    """Asks the persistor to save a round's global model, with the job's round records it has not
    been sent yet (it merges them, by round, into history.json)."""

    TYPE: ClassVar[str] = "model.save"
    job_id: str
    round: int
    dxo: DXO
    model_dir: str = "models"
    model_name: str = "server.npy"
    history: list[dict[str, Any]] = field(default_factory=list)
    final: bool = False  # the job's last round: the server waits for model.saved, which goes at once


@dataclass(frozen=True, slots=True)
class ModelCommit(Message):
    """Asks the persistor to save, as a round's global model, the aggregate of that round it got
    from the aggregator (routed to it because round.open said persist): the server found the new
    global model equal to that aggregate, so the model does not travel through the broker again."""

    TYPE: ClassVar[str] = "model.commit"
    job_id: str
    round: int
    task_id: str
    model_dir: str = "models"
    model_name: str = "server.npy"
    history: list[dict[str, Any]] = field(default_factory=list)
    final: bool = False  # the job's last round: the server waits for model.saved, which goes at once


@dataclass(frozen=True, slots=True)
class ModelSaved(Message):
    """The persistor saved a round's model durably (written, fsynced, renamed); or, with an error, it
    could not: the disk refused the write, and the persistor retries it (or gave up, and the job fails)."""

    TYPE: ClassVar[str] = "model.saved"
    job_id: str
    round: int
    path: str
    error: str = ""  # non-empty: the round is NOT on disk; the I/O error the persistor keeps retrying
    retrying_s: float = 0.0  # with an error: how long the persistor has been retrying
    gave_up: bool = False  # with an error: retried past SAGMQ_PERSIST_RETRY_LIMIT_S; the job fails


@dataclass(frozen=True, slots=True)
class JobEvent(Message):
    """A job changed status; carries the job's meta and history for the persistor."""

    TYPE: ClassVar[str] = "job"
    job_id: str
    name: str
    status: str
    reason: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class CrossValSave(Message):
    """Cross-site evaluation's output for the persistor: a model submitted for validation (owner and dxo),
    or the results matrix {data_client: {model_owner: metrics}} (results_path set)."""

    TYPE: ClassVar[str] = "cross_val.save"
    job_id: str
    cross_val_dir: str
    model_owner: str = ""
    dxo: DXO | None = None
    results_path: str = ""  # relative to the job's folder, e.g. cross_site_val/cross_val_results.json
    results: dict[str, Any] = field(default_factory=dict)


# --- sites and control -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientHeartbeat(Message):
    """A site says it is alive (first one: hello)."""

    TYPE: ClassVar[str] = "client.heartbeat"
    site: str
    hello: bool
    host: str
    pid: int
    allow_custom_code: bool
    busy_job: str = ""
    busy_round: int = -1
    missing_model: str = ""  # id of a task whose forwarded model this site lacks: send it whole
    task_id: str = ""  # the last task this site received whole, and its arrays' bytes (progress of large models)
    task_bytes: int = 0
    receiving_bytes: int = 0  # bytes of the next task (or forwarded model) arrived so far, not yet whole


@dataclass(frozen=True, slots=True)
class Control(Message):
    """An order to services or sites: abort a job's work, or shut down."""

    TYPE: ClassVar[str] = "control"
    command: str
    job_id: str = ""
    target: str = ""


# --- admin RPC ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdminRequest(Message):
    """A command from the sagmq CLI; the reply goes to reply_to with correlation_id."""

    TYPE: ClassVar[str] = "admin.request"
    command: str
    args: dict[str, Any] = field(default_factory=dict)
    files: Files = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AdminReply(Message):
    """The answer to an admin request."""

    TYPE: ClassVar[str] = "admin.reply"
    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    files: Files = field(default_factory=dict)


ALL_MESSAGES: tuple[type[Message], ...] = (
    TrainTask,
    TaskResult,
    RoundOpen,
    RoundClose,
    Contribution,
    RoundAggregated,
    ModelLoad,
    ModelLoaded,
    ModelSave,
    ModelCommit,
    ModelSaved,
    JobEvent,
    CrossValSave,
    ClientHeartbeat,
    Control,
    AdminRequest,
    AdminReply,
)
BY_TYPE: dict[str, type[Message]] = {m.TYPE: m for m in ALL_MESSAGES}
