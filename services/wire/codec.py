"""msgpack codec: DXOs with ndarrays as dtype + shape + raw little-endian bytes.

An ndarray travels as the map ``{"dtype": "<f4", "shape": [3, 3], "data": <bin>}``.
Decoding is ``np.frombuffer`` over the unpacked bytes (no further copy) and refuses
object, string and void dtypes, lying lengths, unknown ext types and oversize bodies.
A DXO of kind COLLECTION (NVFlare's) carries ``{key: sub-DXO map}`` as its data, one level
deep; any other DXO's map is exactly what it was before collections existed.
Nothing here ever unpickles.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack  # type: ignore[import-untyped]  # msgpack ships no type information
import numpy as np

from sagmq.wire.errors import DecodeError

# dtype.str values accepted on the wire (always little-endian or byte-order free).
ALLOWED_DTYPES = frozenset(
    ["<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "|b1"]
)
MAX_NDIM = 32

WEIGHTS = "WEIGHTS"
WEIGHT_DIFF = "WEIGHT_DIFF"
METRICS = "METRICS"
DATA_KINDS = frozenset([WEIGHTS, WEIGHT_DIFF, METRICS])
# NVFlare's DataKind.COLLECTION: a DXO whose data is {key: sub-DXO} (one level; sub-DXOs are of DATA_KINDS)
COLLECTION = "COLLECTION"


@dataclass(frozen=True, slots=True)
class DXO:
    """NVFlare's Data Exchange Object: a kind, named arrays, and free-form meta."""

    kind: str
    data: Mapping[str, np.ndarray]
    meta: Mapping[str, Any] = field(default_factory=dict)
    # kind COLLECTION only: the sub-DXOs by key (NVFlare keeps them in data; here data stays arrays only)
    subs: Mapping[str, DXO] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes of array data carried (a collection's: its sub-DXOs')."""
        return sum(int(a.nbytes) for a in self.data.values()) + sum(d.nbytes() for d in self.subs.values())


def collection(subs: Mapping[str, DXO], meta: Mapping[str, Any] | None = None) -> DXO:
    """A DXO of kind COLLECTION holding sub-DXOs by key (NVFlare's ``DXO(DataKind.COLLECTION, {key: dxo})``)."""
    return DXO(COLLECTION, {}, dict(meta or {}), dict(subs))


def encode_array(a: np.ndarray) -> dict[str, Any]:
    """An ndarray as a msgpack-ready map; the data is a view, not a copy, when possible."""
    arr = np.asarray(a)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if arr.dtype.str not in ALLOWED_DTYPES:
        raise DecodeError(f"dtype {arr.dtype.str!r} cannot travel on the wire")
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")  # (np.ascontiguousarray would turn a 0-d array into shape [1])
    data = arr.reshape(-1).data.cast("B") if arr.size else b""
    return {"dtype": arr.dtype.str, "shape": list(arr.shape), "data": data}


def decode_array(obj: Any, where: str = "array") -> np.ndarray:
    """The inverse of encode_array; raises DecodeError with the reason."""
    if not isinstance(obj, Mapping) or set(obj) != {"dtype", "shape", "data"}:
        raise DecodeError(f"{where}: expected a map with dtype, shape and data")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise DecodeError(f"{where}: dtype {dtype!r} is not allowed")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise DecodeError(f"{where}: shape {shape!r} is not a list of non-negative ints")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"{where}: data is not binary")
    if any(n > 2**40 for n in shape):
        raise DecodeError(f"{where}: shape {shape!r} has an impossible dimension")
    dt = np.dtype(dtype)
    expected = math.prod(shape) * dt.itemsize
    if len(data) != expected:
        raise DecodeError(f"{where}: {len(data)} data bytes for shape {shape} of {dtype} ({expected} expected)")
    return np.frombuffer(data, dtype=dt).reshape(shape)


def encode_dxo(dxo: DXO) -> dict[str, Any]:
    """A DXO as a msgpack-ready map; a COLLECTION's data maps each key to its sub-DXO's map."""
    if dxo.kind == COLLECTION:
        if dxo.data:
            raise DecodeError("a COLLECTION DXO carries sub-DXOs (subs), not arrays")
        return {"kind": COLLECTION, "data": {str(k): _encode_sub(k, v) for k, v in dxo.subs.items()},
                "meta": dict(dxo.meta)}
    if dxo.subs:
        raise DecodeError(f"a DXO of kind {dxo.kind} cannot carry sub-DXOs (only COLLECTION does)")
    return {
        "kind": dxo.kind,
        "data": {str(k): encode_array(v) for k, v in dxo.data.items()},
        "meta": dict(dxo.meta),
    }


def _encode_sub(key: str, sub: DXO) -> dict[str, Any]:
    if sub.kind == COLLECTION:
        raise DecodeError(f"sub-DXO {key!r} is a COLLECTION: sagmq carries one level of collection")
    return encode_dxo(sub)


def decode_dxo(obj: Any, where: str = "dxo") -> DXO:
    """The inverse of encode_dxo; raises DecodeError with the reason."""
    if not isinstance(obj, Mapping) or set(obj) != {"kind", "data", "meta"}:
        raise DecodeError(f"{where}: expected a map with kind, data and meta")
    kind, data, meta = obj["kind"], obj["data"], obj["meta"]
    if not isinstance(kind, str):
        raise DecodeError(f"{where}.kind: not a string")
    if not isinstance(data, Mapping):
        raise DecodeError(f"{where}.data: not a map")
    if not isinstance(meta, Mapping):
        raise DecodeError(f"{where}.meta: not a map")
    if not all(isinstance(k, str) for k in data):
        raise DecodeError(f"{where}.data: variable names must be strings")
    if kind == COLLECTION:
        return collection(_decode_subs(data, where), check_plain(meta, f"{where}.meta"))
    arrays = {k: decode_array(v, f"{where}.data[{k!r}]") for k, v in data.items()}
    return DXO(kind=kind, data=arrays, meta=check_plain(meta, f"{where}.meta"))


def _decode_subs(data: Mapping[str, Any], where: str) -> dict[str, DXO]:
    """A COLLECTION's sub-DXOs (one level: a nested COLLECTION is refused)."""
    subs = {}
    for k, v in data.items():
        sub = decode_dxo(v, f"{where}.data[{k!r}]")
        if sub.kind == COLLECTION:
            raise DecodeError(f"{where}.data[{k!r}]: a COLLECTION inside a COLLECTION is not carried by sagmq")
        subs[k] = sub
    return subs


def check_plain(v: Any, where: str) -> Any:
    """Check a free-form value holds only msgpack's plain types, with string map keys."""
    if v is None or isinstance(v, bool | int | float | str | bytes):
        return v
    if isinstance(v, list):
        return [check_plain(x, where) for x in v]
    if isinstance(v, Mapping):
        if not all(isinstance(k, str) for k in v):
            raise DecodeError(f"{where}: map keys must be strings")
        return {k: check_plain(x, f"{where}.{k}") for k, x in v.items()}
    raise DecodeError(f"{where}: value of type {type(v).__name__} is not allowed")


def _refuse_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack ext type {code} is not part of the sagmq wire format")


def pack(obj: Any) -> bytes:
    """msgpack bytes of a plain structure (maps, lists, scalars, binary)."""
    try:
        body: bytes = msgpack.packb(obj, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError) as e:
        raise DecodeError(f"cannot encode: {e}") from e
    return body


def _str_keys(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    for k, _ in pairs:
        if not isinstance(k, str):
            raise DecodeError(f"map key {k!r} is not a string")
    return dict(pairs)


def unpack(body: bytes, max_bytes: int) -> Any:
    """Decode a body, refusing oversize input, ext types and non-string map keys."""
    if len(body) > max_bytes:
        raise DecodeError(f"body of {len(body)} bytes exceeds the limit of {max_bytes}")
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_refuse_ext, timestamp=0,
                               object_pairs_hook=_str_keys)
    except DecodeError:
        raise
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise DecodeError(f"body is not valid msgpack: {type(e).__name__}: {e}") from e
