"""schemas/*.schema.json against the code: services/wire/messages.py, codec.py, topology.py.

No broker is needed. The tests check that

* every message class has a schema whose properties, required list, property types and
  defaults follow the dataclass and its type hints, and whose x-amqp.type is the class's TYPE;
* the comparison used for that notices a changed schema (so the check cannot go blind);
* real encoded messages validate against the schemas, and bodies the decoder refuses
  are refused by the schemas as well (with jsonschema, a declared test dependency, and always
  with the small validator below, which covers exactly the keywords the schemas use);
* the x-amqp routes (exchange, routing key, queues) agree with the declared topology,
  and the named publishers and consumers really build and read that message;
* schemas/README.md mentions every message type, dtype and dead-letter header.

A msgpack bin value has no JSON counterpart: the schemas write it as
{"type": "string", "contentEncoding": "msgpack-bin"}. Before validation every
bytes/memoryview in a body is replaced by a Bin marker (a str subclass); both validators
accept a Bin only where the schema says msgpack-bin, and a plain str only where it does not.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import numpy as np
import pytest

from sagmq.wire.codec import (
    ALLOWED_DTYPES,
    COLLECTION,
    DXO,
    MAX_NDIM,
    METRICS,
    WEIGHTS,
    collection,
    encode_array,
    encode_dxo,
    unpack,
)
from sagmq.wire.errors import DecodeError
from sagmq.wire.messages import (
    ALL_MESSAGES,
    FAILED,
    JOB_STATUSES,
    RC_EXECUTION_EXCEPTION,
    RC_OK,
    RUNNING,
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
    from_wire,
)
from sagmq.wire.topology import Binding, service_topology, site_topology

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR = ROOT / "schemas"
README = SCHEMA_DIR / "README.md"
SERVICES_DIR = ROOT / "services"

DRAFT = "https://json-schema.org/draft/2020-12/schema"
ID_BASE = "https://sagmq.invalid/schemas/"
BIN_ENCODING = "msgpack-bin"
BIN = {"type": "string", "contentEncoding": BIN_ENCODING}
DXO_REF = {"$ref": "dxo.schema.json"}
SHARED = ("dxo", "ndarray")
# Keywords that only document; the type comparison ignores them.
ANNOTATIONS = frozenset({"description", "default", "title", "$comment", "examples"})



def schema_path(name: str) -> Path:
    return SCHEMA_DIR / f"{name}.schema.json"


def load_schema(name: str) -> dict[str, Any]:
    return json.loads(schema_path(name).read_text(encoding="utf-8"))


def all_schemas() -> dict[str, dict[str, Any]]:
    """Every schema of the message classes and the shared ones, by file stem."""
    return {n: load_schema(n) for n in [*(c.TYPE for c in ALL_MESSAGES), *SHARED]}


def _ids(classes: tuple[type[Message], ...]) -> list[str]:
    return [c.TYPE for c in classes]


# --- type hints -> schema fragments ---------------------------------------------------


def expected_fragment(tp: Any) -> dict[str, Any]:
    """The schema fragment (annotations left out) a field of type tp must have."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return {}
    if origin in (typing.Union, types.UnionType):
        alts = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(alts) != 1 or len(typing.get_args(tp)) != 2:
            raise TypeError(f"only X | None unions are mapped, not {tp!r}")
        return {"anyOf": [expected_fragment(alts[0]), {"type": "null"}]}
    if tp is DXO:
        return dict(DXO_REF)
    simple = {str: "string", int: "integer", float: "number", bool: "boolean"}
    if tp in simple:
        return {"type": simple[tp]}
    if tp is bytes:
        return dict(BIN)
    if origin is list:
        (item,) = typing.get_args(tp)
        return {"type": "array", "items": expected_fragment(item)}
    if origin is dict:
        key, value = typing.get_args(tp)
        if key is not str:
            raise TypeError(f"map keys must be str, not {key!r}")
        return {"type": "object", "additionalProperties": expected_fragment(value)}
    raise TypeError(f"no schema mapping for {tp!r}")


def strip_annotations(node: Any) -> Any:
    """A copy of a schema fragment without documentation keywords."""
    if isinstance(node, dict):
        return {k: strip_annotations(v) for k, v in node.items() if k not in ANNOTATIONS}
    if isinstance(node, list):
        return [strip_annotations(v) for v in node]
    return node


def _has_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _default(f: dataclasses.Field[Any]) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]


def _object_differences(names: list[str], required: list[str], schema: Mapping[str, Any]) -> list[str]:
    """How the schema's object keywords disagree with the class's field names and required fields."""
    out: list[str] = []
    if schema.get("type") != "object":
        out.append(f"type is {schema.get('type')!r}, not 'object'")
    if schema.get("additionalProperties") is not False:
        out.append("additionalProperties is not false")
    props = schema.get("properties", {})
    missing, extra = set(names) - set(props), set(props) - set(names)
    if missing:
        out.append(f"properties missing: {sorted(missing)}")
    if extra:
        out.append(f"properties not in the class: {sorted(extra)}")
    if list(props) != [n for n in names if n in props]:
        out.append(f"properties are not in field order: {list(props)}")
    if list(schema.get("required", [])) != required:
        out.append(f"required is {schema.get('required')!r}, the fields without default are {required!r}")
    return out


def _field_differences(f: dataclasses.Field[Any], hint: Any, prop: Mapping[str, Any]) -> list[str]:
    """How one property of the schema disagrees with the class's field."""
    out: list[str] = []
    want, got = expected_fragment(hint), strip_annotations(prop)
    if got != want:
        out.append(f"{f.name}: schema {got!r}, type hint {hint!r} needs {want!r}")
    if not str(prop.get("description", "")).strip():
        out.append(f"{f.name}: no description")
    if _has_default(f):
        if "default" not in prop or prop["default"] != _default(f):
            out.append(f"{f.name}: default {prop.get('default', '<none>')!r}, the class has {_default(f)!r}")
    elif "default" in prop:
        out.append(f"{f.name}: a required field has a default")
    return out


def schema_differences(cls: type[Message], schema: Mapping[str, Any]) -> list[str]:
    """Every way the schema disagrees with the message class; [] when they agree."""
    fields = dataclasses.fields(cls)
    hints = typing.get_type_hints(cls)
    out = _object_differences([f.name for f in fields], [f.name for f in fields if not _has_default(f)], schema)
    props = schema.get("properties", {})
    for f in fields:
        if f.name in props:
            out += _field_differences(f, hints[f.name], props[f.name])
    amqp = schema.get("x-amqp")
    if not isinstance(amqp, dict) or amqp.get("type") != cls.TYPE:
        out.append(f"x-amqp.type is not {cls.TYPE!r}")
    return out


@pytest.mark.parametrize(
    ("tp", "fragment"),
    [
        (str, {"type": "string"}),
        (int, {"type": "integer"}),
        (float, {"type": "number"}),
        (bool, {"type": "boolean"}),
        (bytes, BIN),
        (Any, {}),
        (DXO, DXO_REF),
        (DXO | None, {"anyOf": [DXO_REF, {"type": "null"}]}),
        (typing.Optional[int], {"anyOf": [{"type": "integer"}, {"type": "null"}]}),  # noqa: UP045 (the old spelling, on purpose)
        (list[str], {"type": "array", "items": {"type": "string"}}),
        (list[Any] | None, {"anyOf": [{"type": "array", "items": {}}, {"type": "null"}]}),
        (dict[str, list[int]], {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "integer"}}}),
        (dict[str, dict[str, bytes]], {"type": "object", "additionalProperties": {"type": "object", "additionalProperties": BIN}}),
    ],
    ids=repr,
)
def test_type_hint_mapping(tp: Any, fragment: dict[str, Any]) -> None:
    assert expected_fragment(tp) == fragment


def test_type_hint_mapping_refuses_what_it_cannot_map() -> None:
    for tp in (int | str, dict[int, str], tuple[int, ...], set[str]):
        with pytest.raises(TypeError):
            expected_fragment(tp)


# --- schema files ---------------------------------------------------------------------


def test_one_schema_file_per_message_and_no_others() -> None:
    want = {f"{c.TYPE}.schema.json" for c in ALL_MESSAGES} | {f"{n}.schema.json" for n in SHARED}
    have = {p.name for p in SCHEMA_DIR.glob("*.json")}
    assert have == want
    assert len({c.TYPE for c in ALL_MESSAGES}) == len(ALL_MESSAGES)


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=_ids(ALL_MESSAGES))
def test_schema_matches_message_class(cls: type[Message]) -> None:
    assert schema_path(cls.TYPE).is_file(), f"schemas/{cls.TYPE}.schema.json is missing"
    assert schema_differences(cls, load_schema(cls.TYPE)) == []


@pytest.mark.parametrize("name", [*_ids(ALL_MESSAGES), *SHARED])
def test_schema_header_and_refs(name: str) -> None:
    s = load_schema(name)
    assert s["$schema"] == DRAFT
    assert s["$id"] == f"{ID_BASE}{name}.schema.json"
    assert s.get("title") and s.get("description")
    for ref in _refs(s):
        target = urljoin(s["$id"], ref)
        assert target.startswith(ID_BASE) and (SCHEMA_DIR / target[len(ID_BASE):]).is_file(), ref
    for prop_name, prop in s["properties"].items():
        assert str(prop.get("description", "")).strip(), f"{name}.{prop_name} has no description"


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for k, v in node.items():
            if k != "x-amqp":
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


@pytest.mark.parametrize("name", [*_ids(ALL_MESSAGES), *SHARED])
def test_schema_is_valid_draft_2020_12(name: str) -> None:
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(load_schema(name))


def test_dxo_and_ndarray_schemas_follow_the_codec() -> None:
    dxo, nd = load_schema("dxo"), load_schema("ndarray")
    sample = encode_dxo(DXO(WEIGHTS, {"w": np.zeros(2, np.float32)}, {}))
    assert list(dxo["properties"]) == list(sample) == dxo["required"]
    assert dxo["additionalProperties"] is False
    # arrays, or (kind COLLECTION) sub-DXOs of this same schema
    assert strip_annotations(dxo["properties"]["data"]) == {
        "type": "object", "additionalProperties": {"anyOf": [{"$ref": "ndarray.schema.json"},
                                                             {"$ref": "dxo.schema.json"}]}}
    coll = encode_dxo(collection({"a": DXO(WEIGHTS, {"w": np.zeros(2, np.float32)}, {})}))
    assert list(coll) == list(sample) and list(coll["data"]["a"]) == list(sample)
    arr = encode_array(np.zeros(2, np.float32))
    assert list(nd["properties"]) == list(arr) == nd["required"]
    assert nd["additionalProperties"] is False
    assert nd["properties"]["dtype"]["enum"] == sorted(ALLOWED_DTYPES)
    assert nd["properties"]["shape"]["maxItems"] == MAX_NDIM
    assert nd["properties"]["shape"]["items"] == {"type": "integer", "minimum": 0}
    assert strip_annotations(nd["properties"]["data"]) == BIN


# --- the comparison notices changes ---------------------------------------------------


def _drop_first_property(s: dict[str, Any]) -> None:
    name = next(iter(s["properties"]))
    del s["properties"][name]
    if name in s["required"]:
        s["required"].remove(name)


def _retype_first_property(s: dict[str, Any]) -> None:
    prop = next(iter(s["properties"].values()))
    new_type = "string" if prop.get("type") == "boolean" else "boolean"
    prop.clear()
    prop.update({"description": "changed", "type": new_type})


MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "drop a property": _drop_first_property,
    "retype a property": _retype_first_property,
    "add a property": lambda s: s["properties"].update({"extra": {"description": "x", "type": "string"}}),
    "drop from required": lambda s: s["required"].pop(),
    "add to required": lambda s: s["required"].append("nope"),
    "allow additional properties": lambda s: s.update({"additionalProperties": True}),
    "wrong x-amqp type": lambda s: s["x-amqp"].update({"type": "other"}),
    "no x-amqp": lambda s: s.pop("x-amqp"),
    "array instead of object": lambda s: s.update({"type": "array"}),
    "empty description": lambda s: next(iter(s["properties"].values())).update({"description": ""}),
}


CASES = [(c, m) for c in ALL_MESSAGES for m in MUTATIONS
         if not (m == "drop from required" and not load_schema(c.TYPE)["required"])]


@pytest.mark.parametrize(("cls", "mutation"), CASES, ids=[f"{c.TYPE}-{m}" for c, m in CASES])
def test_comparison_catches_schema_changes(cls: type[Message], mutation: str) -> None:
    s = copy.deepcopy(load_schema(cls.TYPE))
    MUTATIONS[mutation](s)
    assert schema_differences(cls, s), f"{mutation} went unnoticed"


@pytest.mark.parametrize(
    ("cls", "field_name", "change"),
    [
        (TaskResult, "dxo", lambda p: p.update({"anyOf": [DXO_REF]})),  # no longer optional
        (TaskResult, "error", lambda p: p.update({"default": "x"})),  # wrong default
        (TrainTask, "apps", lambda p: p["additionalProperties"].update({"additionalProperties": {"type": "string"}})),
        (RoundOpen, "var_shapes", lambda p: p["additionalProperties"].update({"items": {"type": "number"}})),
        (ModelLoad, "initial", lambda p: p.update({"anyOf": [{"type": "array", "items": {}}]})),
        (ModelSave, "history", lambda p: p.pop("default")),
        (AdminRequest, "files", lambda p: p["additionalProperties"].pop("contentEncoding")),
        (ModelLoaded, "dxo", lambda p: p.update({"$ref": "ndarray.schema.json"})),
    ],
    ids=lambda v: v if isinstance(v, str) else getattr(v, "TYPE", ""),
)
def test_comparison_catches_nested_changes(cls: type[Message], field_name: str, change: Callable[[Any], None]) -> None:
    s = copy.deepcopy(load_schema(cls.TYPE))
    change(s["properties"][field_name])
    diffs = schema_differences(cls, s)
    assert diffs and all(d.startswith(f"{field_name}:") for d in diffs), diffs


# --- validating real messages ---------------------------------------------------------


class Bin(str):
    """Stands for a msgpack bin value in an instance checked against a schema."""


def to_instance(v: Any) -> Any:
    """A wire body with every binary value replaced by a Bin marker."""
    if isinstance(v, bytes | bytearray | memoryview):
        return Bin(f"<{memoryview(v).nbytes} bytes>")
    if isinstance(v, Mapping):
        return {k: to_instance(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [to_instance(x) for x in v]
    return v


def _registry() -> dict[str, dict[str, Any]]:
    return {s["$id"]: s for s in all_schemas().values()}


def _is_type(x: Any, t: str, schema: Mapping[str, Any]) -> bool:
    if t == "string":
        return isinstance(x, str) and isinstance(x, Bin) == (schema.get("contentEncoding") == BIN_ENCODING)
    if t == "integer":
        return isinstance(x, int) and not isinstance(x, bool)
    if t == "number":
        return isinstance(x, int | float) and not isinstance(x, bool)
    checks = {"boolean": bool, "null": type(None), "array": list, "object": dict}
    return isinstance(x, checks[t])


TINY_KEYWORDS = frozenset({
    "$schema", "$id", "$ref", "type", "properties", "required", "additionalProperties", "items", "anyOf",
    "enum", "minimum", "maxItems", "contentEncoding", "x-amqp",
}) | ANNOTATIONS


def tiny_errors(x: Any, schema: Mapping[str, Any], registry: Mapping[str, Any], base: str = "",
                path: str = "$") -> list[str]:
    """Errors of x against schema, for the keywords in TINY_KEYWORDS (anything else raises)."""
    unknown = set(schema) - TINY_KEYWORDS
    if unknown:
        raise NotImplementedError(f"the tiny validator does not know {sorted(unknown)}")
    base = urljoin(base, schema["$id"]) if "$id" in schema else base
    errors: list[str] = []
    if "$ref" in schema:
        errors += tiny_errors(x, registry[urljoin(base, schema["$ref"])], registry, base, path)
    if "anyOf" in schema and all(tiny_errors(x, alt, registry, base, path) for alt in schema["anyOf"]):
        errors.append(f"{path}: matches none of anyOf")
    if "enum" in schema and not any(type(x) is type(e) and x == e for e in schema["enum"]):
        errors.append(f"{path}: {x!r} is not one of {schema['enum']}")
    wrong_type = _tiny_type_error(x, schema, path)
    if wrong_type:  # nothing else is worth checking in a value of the wrong type
        return [*errors, wrong_type]
    if schema.get("contentEncoding") == BIN_ENCODING and isinstance(x, str) and not isinstance(x, Bin):
        errors.append(f"{path}: text where binary is expected")
    if isinstance(x, dict):
        errors += _tiny_object_errors(x, schema, registry, base, path)
    if isinstance(x, list):
        errors += _tiny_array_errors(x, schema, registry, base, path)
    if "minimum" in schema and _is_type(x, "number", schema) and x < schema["minimum"]:
        errors.append(f"{path}: {x} < {schema['minimum']}")
    return errors


def _tiny_type_error(x: Any, schema: Mapping[str, Any], path: str) -> str:
    """The error of x against the schema's "type" keyword; "" when it has the type (or none is given)."""
    if "type" not in schema:
        return ""
    wanted = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    if any(_is_type(x, t, schema) for t in wanted):
        return ""
    return (f"{path}: {type(x).__name__} {x!r} is not {'/'.join(wanted)}"
            + (" (binary)" if schema.get("contentEncoding") == BIN_ENCODING else ""))


def _tiny_object_errors(x: dict[Any, Any], schema: Mapping[str, Any], registry: Mapping[str, Any], base: str,
                        path: str) -> list[str]:
    """Errors of a map against the schema's required, properties and additionalProperties."""
    errors: list[str] = []
    props = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in x:
            errors.append(f"{path}: {name!r} is required")
    for k, v in x.items():
        if not isinstance(k, str):
            errors.append(f"{path}: map key {k!r} is not a string")
        elif k in props:
            errors += tiny_errors(v, props[k], registry, base, f"{path}.{k}")
        elif schema.get("additionalProperties") is False:
            errors.append(f"{path}: unexpected property {k!r}")
        elif isinstance(schema.get("additionalProperties"), dict):
            errors += tiny_errors(v, schema["additionalProperties"], registry, base, f"{path}[{k!r}]")
    return errors


def _tiny_array_errors(x: list[Any], schema: Mapping[str, Any], registry: Mapping[str, Any], base: str,
                       path: str) -> list[str]:
    """Errors of a list against the schema's maxItems and items."""
    errors: list[str] = []
    if "maxItems" in schema and len(x) > schema["maxItems"]:
        errors.append(f"{path}: more than {schema['maxItems']} items")
    if "items" in schema:
        for i, v in enumerate(x):
            errors += tiny_errors(v, schema["items"], registry, base, f"{path}[{i}]")
    return errors


def _jsonschema_errors(x: Any, schema: Mapping[str, Any]) -> list[str]:
    import jsonschema
    from jsonschema.exceptions import ValidationError
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    base = jsonschema.Draft202012Validator

    def content_encoding(_v: Any, value: Any, instance: Any, _s: Any) -> Iterator[ValidationError]:
        if value == BIN_ENCODING and isinstance(instance, str) and not isinstance(instance, Bin):
            yield ValidationError(f"text {instance!r} where binary is expected")

    def type_(v: Any, value: Any, instance: Any, s: Any) -> Iterator[ValidationError]:
        yield from base.VALIDATORS["type"](v, value, instance, s)
        if isinstance(instance, Bin) and s.get("contentEncoding") != BIN_ENCODING:
            yield ValidationError(f"binary {instance!r} where text is expected")

    checker = base.TYPE_CHECKER.redefine("integer", lambda _c, i: isinstance(i, int) and not isinstance(i, bool))
    strict = jsonschema.validators.extend(
        base, validators={"type": type_, "contentEncoding": content_encoding}, type_checker=checker)
    # Without "$schema", a referenced schema is checked by `strict` too: jsonschema picks the
    # validator class of a schema that names its dialect, which would drop the extensions.
    plain = [{k: v for k, v in s.items() if k != "$schema"} for s in all_schemas().values()]
    registry = Registry().with_resources((s["$id"], Resource(s, DRAFT202012)) for s in plain)
    top = {k: v for k, v in schema.items() if k != "$schema"}
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in strict(top, registry=registry).iter_errors(x)]


VALIDATORS = ["tiny", "jsonschema"]  # jsonschema is a declared test dependency


def validation_errors(kind: str, wire: Any, schema: Mapping[str, Any]) -> list[str]:
    """Errors of a wire body (bytes and all) against a schema, with the validator named."""
    x = to_instance(wire)
    if kind == "tiny":
        return tiny_errors(x, schema, _registry())
    return _jsonschema_errors(x, schema)


def _dxo(meta: dict[str, Any] | None = None) -> DXO:
    return DXO(
        WEIGHTS,
        {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "empty": np.zeros((0,), np.float32)},
        {"current_round": 1, "num_rounds": 3} if meta is None else meta,
    )


JOB_ID = "0123456789abcdef0123456789abcdef"
TASK_ID = "fedcba9876543210fedcba9876543210"
APP_FILES = {"config/config_fed_client.json": b'{"format_version": 2, "executors": []}'}

TASK = TrainTask(JOB_ID, 1, 3, 0, "train", TASK_ID, ["site-1", "site-2"], _dxo(),
                 {"app": ["@ALL"], "app_server": ["server"]}, {"app": APP_FILES})
RESULT = TaskResult(JOB_ID, 1, "train", TASK_ID, "site-1", RC_OK, _dxo({"NUM_STEPS_CURRENT_ROUND": 1}))
FAILED_RESULT = TaskResult(JOB_ID, 1, "train", TASK_ID, "site-2", RC_EXECUTION_EXCEPTION, None, "ValueError: boom")
OPEN = RoundOpen(JOB_ID, 1, TASK_ID, ["site-1", "site-2"], WEIGHTS, {"site-1": 2.0}, {"w": "<f4"}, {"w": [2, 3]},
                 "^bias", False)
SAVED = ModelSaved(JOB_ID, 1, "/var/lib/sagmq/persistor/jobs/x/models/server.npy")
# NVFlare's collection mode: a COLLECTION result, its round.open and its aggregate
COLLECTION_DXO = collection({"model": _dxo({"NUM_STEPS_CURRENT_ROUND": 2}),
                             "scores": DXO(METRICS, {"accuracy": np.array(0.5)}, {})}, {"note": "two keys"})
COLLECTION_RESULT = TaskResult(JOB_ID, 1, "train", TASK_ID, "site-1", RC_OK, COLLECTION_DXO)
COLLECTION_OPEN = RoundOpen(JOB_ID, 1, TASK_ID, ["site-1"], COLLECTION, {}, {"w": "<f4"}, {"w": [2, 3]},
                            collection_kinds={"model": WEIGHTS, "scores": METRICS},
                            collection_weights={"model": {"site-1": 2.0}, "scores": {}},
                            collection_exclude_vars={"model": "^empty$", "scores": ""})
ABORT = Control("abort", JOB_ID)
SUBMIT = AdminRequest("submit", {}, {"meta.json": b"{}", "app/config/config_fed_client.json": b"{}"})

SAMPLES: list[Message] = [
    TASK,
    RESULT,
    FAILED_RESULT,
    OPEN,
    RoundOpen(JOB_ID, 2, TASK_ID, ["site-1"], WEIGHTS, {}, {"w": "<f4"}, {"w": [2, 3]}, "", True, True),
    RoundClose(JOB_ID, 1, "all 2 targets answered"),
    Contribution(JOB_ID, 1, "site-1", True, RC_OK),
    Contribution(JOB_ID, 1, "site-2", False, RC_EXECUTION_EXCEPTION, "site site-2 returned rc EXECUTION_EXCEPTION"),
    RoundAggregated(JOB_ID, 1, ["site-1"], _dxo({"accepted": ["site-1"]})),
    RoundAggregated(JOB_ID, 1, ["site-1"], _dxo({"accepted": ["site-1"]}), "t-1"),
    RoundAggregated(JOB_ID, 1, [], None),
    COLLECTION_RESULT,
    COLLECTION_OPEN,
    RoundAggregated(JOB_ID, 1, ["site-1"], COLLECTION_DXO),
    RoundAggregated(JOB_ID, 1, ["site-1"], None, "t-1", "", {"site-1": {"loss": 0.25, "initial_metrics": 1.0}}),
    ModelLoad(JOB_ID, "models", "server.npy", [[1, 2.5], [3, 4]]),
    ModelLoad(JOB_ID),
    ModelLoaded(JOB_ID, "saved", _dxo({}), 2),
    ModelSave(JOB_ID, 1, _dxo({}), "models", "server.npy", [{"round": 0, "accepted": ["site-1"], "seconds": 0.5}]),
    ModelCommit(JOB_ID, 1, "t-1", "models", "server.npy", [{"round": 1, "accepted": ["site-1"], "seconds": 0.5}]),
    ModelCommit(JOB_ID, 2, "t-2"),
    SAVED,
    JobEvent(JOB_ID, "hello-numpy-sag", RUNNING, "", {"started_at": 1.5, "finished_at": None, "min_clients": 2}, []),
    JobEvent(JOB_ID, "hello-numpy-sag", FAILED, "round 1: too few results"),
    ClientHeartbeat("site-1", True, "host-a", 4242, False, JOB_ID, 1),
    ClientHeartbeat("site-1", False, "host-a", 4242, False, JOB_ID, 1, "", "t1", 20 * 2**20),
    TrainTask(JOB_ID, 3, 3, 0, "validate", TASK_ID, ["site-1"], _dxo({"model_owner": "SRV_server"}), {"app": ["@ALL"]},
              {"app": APP_FILES}, result_to="server"),
    CrossValSave(JOB_ID, "cross_site_val", model_owner="site-1", dxo=_dxo()),
    CrossValSave(JOB_ID, "cross_site_val", results_path="cross_site_val/cross_val_results.json",
                 results={"site-1": {"SRV_server": {"accuracy": 3.5}}}),
    ABORT,
    Control("shutdown", target="all"),
    SUBMIT,
    AdminRequest("status", {"job_id": JOB_ID}),
    AdminReply(True, {"jobs": [{"job_id": JOB_ID, "started_at": None}]}),
    AdminReply(True, {"job_id": JOB_ID, "count": 1}, files={"models/server.npy": b"\x93NUMPY"}),
    AdminReply(False, error="unknown command 'x'"),
]


def test_every_message_class_has_a_sample() -> None:
    assert {type(m) for m in SAMPLES} == set(ALL_MESSAGES)


def _sample_id(m: Message) -> str:
    return m.TYPE


@pytest.mark.parametrize("kind", VALIDATORS)
@pytest.mark.parametrize("msg", SAMPLES, ids=_sample_id)
def test_encoded_messages_validate(kind: str, msg: Message) -> None:
    schema = load_schema(msg.TYPE)
    wire = msg.to_wire()  # what a publisher packs: arrays as memoryviews
    assert validation_errors(kind, wire, schema) == []
    decoded = unpack(msg.encode(), 2**30)  # what a consumer sees: bin arrives as bytes
    assert validation_errors(kind, decoded, schema) == []
    from_wire(type(msg), decoded)


def _body(msg: Message) -> dict[str, Any]:
    return unpack(msg.encode(), 2**30)  # type: ignore[no-any-return]


def _walk(body: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for p in path:
        body = body[p]
    return body


def _set(*path_and_value: Any) -> Callable[[dict[str, Any]], None]:
    *path, last, value = path_and_value
    return lambda body: _walk(body, tuple(path)).__setitem__(last, value)


def _drop(*path: str) -> Callable[[dict[str, Any]], None]:
    *parents, last = path
    return lambda body: _walk(body, tuple(parents)).__delitem__(last)


# (name, message, change to its decoded body, whether the decoder and the schema accept the result)
BODY_CASES: list[tuple[str, Message, Callable[[dict[str, Any]], None], bool]] = [
    ("round as text", TASK, _set("round", "1"), False),
    ("round as float", TASK, _set("round", 1.0), False),
    ("round as bool", TASK, _set("round", True), False),
    ("round missing", TASK, _drop("round"), False),
    ("unknown field", RESULT, _set("extra", 1), False),
    ("defaulted field left out", FAILED_RESULT, _drop("error"), True),
    ("optional dxo left out", FAILED_RESULT, _drop("dxo"), True),
    ("null for a non-optional field", ABORT, _set("job_id", None), False),
    ("text where binary is expected", SUBMIT, _set("files", "meta.json", "{}"), False),
    ("binary where text is expected", SAVED, _set("path", b"/x"), False),
    ("integer for a number", OPEN, _set("aggregation_weights", "site-1", 2), True),
    ("text in a list of strings", OPEN, _set("targets", ["site-1", 2]), False),
    ("float in a shape map", OPEN, _set("var_shapes", "w", [2, 3.0]), False),
    ("big-endian dtype", TASK, _set("dxo", "data", "w", "dtype", ">f4"), False),
    ("object dtype", TASK, _set("dxo", "data", "w", "dtype", "|O"), False),
    ("float in an ndarray shape", TASK, _set("dxo", "data", "w", "shape", [2, 3.0]), False),
    ("negative dimension", TASK, _set("dxo", "data", "w", "shape", [-2, -3]), False),
    ("ndarray with an extra key", TASK, _set("dxo", "data", "w", "order", "C"), False),
    ("ndarray data as text", TASK, _set("dxo", "data", "w", "data", "AAAA"), False),
    ("dxo without meta", RESULT, _drop("dxo", "meta"), False),
    ("dxo with an extra key", RESULT, _set("dxo", "extra", {}), False),
    ("dxo as a list", RESULT, _set("dxo", []), False),
    ("free-form meta holds anything plain", RESULT, _set("dxo", "meta", "x", [1, None, b"\x00", {"a": 1.5}]), True),
    ("collection sub-DXO without meta", COLLECTION_RESULT, _drop("dxo", "data", "model", "meta"), False),
    ("collection sub-DXO as a list", COLLECTION_RESULT, _set("dxo", "data", "model", []), False),
    ("collection sub-DXO with a bad dtype", COLLECTION_RESULT, _set("dxo", "data", "model", "data", "w", "dtype", "|O"),
     False),
    ("collection per-key weights not numbers", COLLECTION_OPEN, _set("collection_weights", "model", "site-1", "x"),
     False),
]


@pytest.mark.parametrize("kind", VALIDATORS)
@pytest.mark.parametrize(("name", "msg", "change", "ok"), BODY_CASES, ids=[c[0] for c in BODY_CASES])
def test_schema_and_decoder_agree(kind: str, name: str, msg: Message, change: Callable[[dict[str, Any]], None],
                                  ok: bool) -> None:
    body = _body(msg)
    change(body)
    errors = validation_errors(kind, body, load_schema(msg.TYPE))
    assert (errors == []) is ok, errors
    if ok:
        from_wire(type(msg), body)
    else:
        with pytest.raises(DecodeError):
            from_wire(type(msg), body)


@pytest.mark.parametrize("kind", VALIDATORS)
def test_byte_count_is_beyond_the_schema(kind: str) -> None:
    """The schema cannot compare len(data) with shape x itemsize; the decoder does (see README)."""
    body = _body(TASK)
    body["dxo"]["data"]["w"]["data"] = body["dxo"]["data"]["w"]["data"][:-4]
    assert validation_errors(kind, body, load_schema("task")) == []
    with pytest.raises(DecodeError, match="data bytes"):
        from_wire(TrainTask, body)


def test_tiny_validator_refuses_unknown_keywords() -> None:
    with pytest.raises(NotImplementedError):
        tiny_errors("x", {"type": "string", "pattern": "^a"}, {})


# --- x-amqp routes against topology.py and the services -------------------------------

PREFIX = "sag"
SITE = "site-1"
PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "<site>": (SITE,),
    "<status>": JOB_STATUSES,
    "<target>": ("aggregator", "persistor", "all"),
}
# Service names in x-amqp publisher/consumer -> package under services/.
SERVICE_PACKAGES = {"server": "server", "aggregator": "aggregator", "persistor": "persistor", "client": "client",
                    "admin": "cli"}
ROUTE_KEYS = {"exchange", "exchange_type", "routing_key", "publisher", "consumer", "queues", "headers"}
HEADER_NAMES = {"job_id", "round", "site", "BCC"}


def _topology() -> tuple[dict[str, str], list[Binding]]:
    service, site = service_topology(PREFIX), site_topology(PREFIX, SITE)
    exchanges = {e.name: e.type for e in (*service.exchanges, *site.exchanges)}
    return exchanges, [*service.bindings, *site.bindings]


def _routes(schema: Mapping[str, Any]) -> list[dict[str, Any]]:
    amqp = schema["x-amqp"]
    main = {k: v for k, v in amqp.items() if k not in ("type", "also")}
    return [main, *amqp.get("also", [])]


def _expansions(route: Mapping[str, Any]) -> list[tuple[str, str, set[str]]]:
    """(exchange, routing key, queues) for every value of the placeholders in the route."""
    def sub(text: str, ph: str | None, value: str) -> str:
        text = text.replace("{prefix}", PREFIX)
        return text.replace(ph, value) if ph else text

    used = [p for p in PLACEHOLDERS if p in route["routing_key"]]
    assert len(used) <= 1, route["routing_key"]
    ph = used[0] if used else None
    values = PLACEHOLDERS[ph] if ph else ("",)
    return [(sub(route["exchange"], ph, v), sub(route["routing_key"], ph, v), {sub(q, ph, v) for q in route["queues"]})
            for v in values]


def _topic_match(pattern: str, key: str) -> bool:
    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and (p[0] == "*" or p[0] == k[0]) and match(p[1:], k[1:])

    return match(pattern.split("."), key.split("."))


def _reached(exchanges: Mapping[str, str], bindings: list[Binding], exchange: str, key: str) -> list[Binding]:
    etype = exchanges[exchange]
    return [b for b in bindings if b.exchange == exchange and (
        etype == "fanout" or (etype == "direct" and b.routing_key == key)
        or (etype == "topic" and _topic_match(b.routing_key, key)))]


def test_topic_match() -> None:
    assert _topic_match("job.*", "job.running")
    assert not _topic_match("job.*", "job")
    assert _topic_match("#", "a.b") and _topic_match("a.#", "a")
    assert not _topic_match("round.open", "round.close")


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=_ids(ALL_MESSAGES))
def test_x_amqp_routes_follow_the_topology(cls: type[Message]) -> None:
    exchanges, bindings = _topology()
    for route in _routes(load_schema(cls.TYPE)):
        assert set(route) >= ROUTE_KEYS, sorted(ROUTE_KEYS - set(route))
        assert set(route["headers"]) <= HEADER_NAMES
        assert route["publisher"] and route["consumer"]
        if route["exchange"] == "":  # default exchange: an RPC reply via direct reply-to
            assert route["queues"] == [] and "reply_to" in route["routing_key"]
            continue
        hit: set[str] = set()
        for exchange, key, queues in _expansions(route):
            assert exchanges.get(exchange) == route["exchange_type"], exchange
            reached = {b.queue for b in _reached(exchanges, bindings, exchange, key)}
            assert reached and reached <= queues, f"{exchange} {key!r} reaches {reached}, schema says {queues}"
            hit |= reached
        assert hit == {q for _, _, qs in _expansions(route) for q in qs}


def test_every_binding_is_documented_by_a_route() -> None:
    exchanges, bindings = _topology()
    covered: set[Binding] = set()
    for schema in all_schemas().values():
        if "x-amqp" not in schema:
            continue
        for route in _routes(schema):
            if route["exchange"]:
                for exchange, key, _ in _expansions(route):
                    covered.update(_reached(exchanges, bindings, exchange, key))
    dead = f"{PREFIX}.dead"
    assert {b for b in bindings if b.exchange != dead} - covered == set()


def _package_source(service: str) -> str:
    pkg = SERVICES_DIR / SERVICE_PACKAGES[service]
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(pkg.glob("*.py")))


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=_ids(ALL_MESSAGES))
def test_publishers_build_and_consumers_read_the_message(cls: type[Message]) -> None:
    name = cls.__name__
    for route in _routes(load_schema(cls.TYPE)):
        for pub in route["publisher"]:
            assert re.search(rf"\b{name}\(", _package_source(pub)), f"{pub} never builds a {name}"
        for con in route["consumer"]:
            src = _package_source(con)
            # read by type, decoded as the class, or told apart after a decode by a table of classes
            assert (any(p in src for p in (f"{name}.TYPE", f"decode({name},", f".message({name},"))
                    or re.search(rf"\bisinstance\(\w+, {name}\)", src)), f"{con} never reads a {name}"


# --- README ---------------------------------------------------------------------------


def test_readme_covers_types_dtypes_and_dead_letter_headers() -> None:
    text = README.read_text(encoding="utf-8")
    for cls in ALL_MESSAGES:
        assert f"`{cls.TYPE}`" in text, cls.TYPE
    for dtype in ALLOWED_DTYPES:
        assert f"`{dtype}`" in text, dtype
    bus_src = "\n".join(p.read_text(encoding="utf-8") for d in ("wire", "amqp", "memory")
                         for p in sorted((SERVICES_DIR / d).glob("*.py")))
    headers = set(re.findall(r'"(x-sagmq-[a-z-]+)"', bus_src))
    assert headers
    for h in headers:
        assert f"`{h}`" in text, h
    assert "msgpack-bin" in text
