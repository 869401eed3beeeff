"""The msgpack codec: ndarrays, DXOs, and the refusals of decode_array and unpack."""

from __future__ import annotations

import pickle

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sagmq.wire.codec import (
    ALLOWED_DTYPES,
    DXO,
    WEIGHT_DIFF,
    WEIGHTS,
    decode_array,
    decode_dxo,
    encode_array,
    encode_dxo,
    pack,
    unpack,
)
from sagmq.wire.errors import DecodeError

# When a @given test fails, Hypothesis's pytest plugin imports libcst, which warns through
# mypy_extensions; with filterwarnings=error that would turn a failure into INTERNALERROR.
pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")

LIMIT = 64 * 2**20
MULTI_BYTE = sorted(d for d in ALLOWED_DTYPES if np.dtype(d).itemsize > 1)


def roundtrip(a: np.ndarray) -> np.ndarray:
    return decode_array(unpack(pack(encode_array(a)), LIMIT))


def assert_bit_exact(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    # tobytes, not ==: NaN != NaN, and the payload of each NaN must survive too.
    assert got.tobytes() == np.ascontiguousarray(want).tobytes()
    if want.dtype.kind != "f":
        np.testing.assert_array_equal(got, want)


# --- round trips --------------------------------------------------------------------


@st.composite
def wire_arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(sorted(ALLOWED_DTYPES))))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
    return draw(hnp.arrays(dtype=dtype, shape=shape))


@settings(database=None, deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(wire_arrays())
def test_roundtrip_is_bit_exact_for_every_allowed_dtype_and_shape(a: np.ndarray) -> None:
    got = roundtrip(a)
    assert got.dtype.str == a.dtype.str
    assert_bit_exact(got, a)


@pytest.mark.parametrize("dtype", sorted(ALLOWED_DTYPES))
@pytest.mark.parametrize("shape", [(0,), (3, 0, 2), (1,), (2, 3)])
def test_roundtrip_every_dtype_fixed_shapes(dtype: str, shape: tuple[int, ...]) -> None:
    a = (np.arange(int(np.prod(shape)), dtype=np.int64) % 2).astype(dtype).reshape(shape)
    got = roundtrip(a)
    assert_bit_exact(got, a)


@pytest.mark.parametrize("a", [np.array(1.5, dtype="<f4"), np.array(7, dtype="<i8"), np.array(True)])
def test_zero_d_array_keeps_its_shape(a: np.ndarray) -> None:
    assert a.shape == ()
    assert encode_array(a)["shape"] == []
    got = roundtrip(a)
    assert got.shape == ()
    assert got.dtype == a.dtype
    assert got.tobytes() == a.tobytes()


def test_float_nan_inf_and_negative_zero_survive_bit_exact() -> None:
    a = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-40], dtype="<f4")
    got = roundtrip(a)
    assert got.tobytes() == a.tobytes()
    assert np.signbit(got[4]) and not np.signbit(got[5])


@pytest.mark.parametrize("dtype", MULTI_BYTE)
def test_big_endian_input_comes_back_little_endian_with_equal_values(dtype: str) -> None:
    le = (np.arange(6) % 2 + 1).astype(dtype).reshape(2, 3)
    be = le.astype(np.dtype(dtype).newbyteorder(">"))
    assert be.dtype.byteorder == ">"
    enc = encode_array(be)
    assert enc["dtype"] == np.dtype(dtype).str
    got = roundtrip(be)
    assert got.dtype.str == np.dtype(dtype).str
    assert got.dtype.byteorder in ("<", "|", "=")
    np.testing.assert_array_equal(got, be)
    assert got.tobytes() == le.tobytes()


def test_big_endian_values_not_just_bytes() -> None:
    be = np.array([1.5, -2.25, 1e10], dtype=">f8")
    got = roundtrip(be)
    assert got.dtype.str == "<f8"
    assert got.tolist() == [1.5, -2.25, 1e10]


def test_transposed_array_roundtrips() -> None:
    a = np.arange(12, dtype="<f4").reshape(3, 4).T
    assert not a.flags.c_contiguous
    got = roundtrip(a)
    assert got.shape == (4, 3)
    np.testing.assert_array_equal(got, a)


def test_strided_slice_roundtrips() -> None:
    base = np.arange(40, dtype="<i8").reshape(4, 10)
    a = base[::2, 1::3]
    assert not a.flags.c_contiguous
    got = roundtrip(a)
    assert got.shape == a.shape
    np.testing.assert_array_equal(got, a)


def test_big_endian_transposed_roundtrips() -> None:
    a = np.arange(6, dtype=">i4").reshape(2, 3).T
    got = roundtrip(a)
    assert got.dtype.str == "<i4"
    np.testing.assert_array_equal(got, a)


def test_encode_refuses_dtypes_that_cannot_travel() -> None:
    for a in (np.array(["a"]), np.array([object()], dtype=object), np.array([1 + 2j])):
        with pytest.raises(DecodeError):
            encode_array(a)


def test_encoded_form_is_dtype_shape_data() -> None:
    enc = encode_array(np.array([[1, 2], [3, 4]], dtype="<u2"))
    assert set(enc) == {"dtype", "shape", "data"}
    assert enc["dtype"] == "<u2"
    assert enc["shape"] == [2, 2]
    assert bytes(enc["data"]) == np.array([1, 2, 3, 4], dtype="<u2").tobytes()


# --- decoded arrays are read-only views ---------------------------------------------------


@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 2)])
def test_decoded_arrays_are_read_only(shape: tuple[int, ...]) -> None:
    a = roundtrip(np.ones(shape, dtype="<f4"))
    assert not a.flags.writeable
    if a.size:
        with pytest.raises(ValueError):
            a.flat[0] = 2.0


def test_decoded_array_views_the_body_bytes() -> None:
    data = np.arange(4, dtype="<i4").tobytes()
    a = decode_array({"dtype": "<i4", "shape": [4], "data": data})
    assert not a.flags.writeable
    assert not a.flags.owndata
    assert a.base is not None


# --- decode_array refusals ---------------------------------------------------------------


def good() -> dict:
    return {"dtype": "<f4", "shape": [2], "data": np.zeros(2, "<f4").tobytes()}


@pytest.mark.parametrize("dtype", ["|O", "<U4", "|V8", ">f4", "<c8", "f4", "float32", "|S3", 4, None])
def test_decode_refuses_dtype(dtype: object) -> None:
    obj = good()
    obj["dtype"] = dtype
    with pytest.raises(DecodeError, match="dtype"):
        decode_array(obj)


def test_decode_refuses_object_dtype_with_pointer_sized_data() -> None:
    # 8 bytes per element would match '|O' on 64-bit: the dtype check must come first.
    with pytest.raises(DecodeError):
        decode_array({"dtype": "|O", "shape": [1], "data": b"\x00" * 8})


@pytest.mark.parametrize("shape", ["2", 2, (2,), {"0": 2}, None, [-1], [2, -1], [True], [True, 1], [2.0], ["2"],
                                   [1] * 33])
def test_decode_refuses_bad_shape(shape: object) -> None:
    obj = good()
    obj["shape"] = shape
    with pytest.raises(DecodeError, match="shape"):
        decode_array(obj)


@pytest.mark.parametrize("nbytes", [0, 4, 7, 9, 12])
def test_decode_refuses_data_length_mismatch(nbytes: int) -> None:
    obj = good()
    obj["data"] = b"\x00" * nbytes
    with pytest.raises(DecodeError, match="data bytes"):
        decode_array(obj)


def test_decode_refuses_data_that_is_not_binary() -> None:
    obj = good()
    obj["data"] = "\x00" * 8
    with pytest.raises(DecodeError, match="binary"):
        decode_array(obj)


@pytest.mark.parametrize("missing", ["dtype", "shape", "data"])
def test_decode_refuses_missing_key(missing: str) -> None:
    obj = good()
    del obj[missing]
    with pytest.raises(DecodeError):
        decode_array(obj)


def test_decode_refuses_extra_key() -> None:
    obj = good()
    obj["order"] = "C"
    with pytest.raises(DecodeError):
        decode_array(obj)


def test_decode_refuses_non_map() -> None:
    for obj in ([1, 2], b"\x00" * 8, None, "x"):
        with pytest.raises(DecodeError):
            decode_array(obj)


def test_decode_error_names_where() -> None:
    obj = good()
    obj["dtype"] = "|O"
    with pytest.raises(DecodeError, match=r"dxo\.data\['w'\]"):
        decode_array(obj, "dxo.data['w']")


@pytest.mark.parametrize("shape", [[2**63, 0], [2**64 - 1, 0], [0, 2**63]])
def test_decode_refuses_zero_size_shape_with_a_huge_dimension(shape: list[int]) -> None:
    # msgpack carries uint64; the length check passes (0 bytes) but numpy cannot build
    # such an array. That must be a DecodeError, not a bare ValueError.
    with pytest.raises(DecodeError):
        decode_array({"dtype": "<f4", "shape": shape, "data": b""})


# --- unpack refusals ---------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"\xc1", b"\x92\x01", b"\xdb\xff\xff\xff\xff", b"\x81\xa1k", b"\x93\x01\x02"])
def test_unpack_refuses_garbage(body: bytes) -> None:
    with pytest.raises(DecodeError):
        unpack(body, LIMIT)


def test_unpack_refuses_trailing_bytes() -> None:
    with pytest.raises(DecodeError):
        unpack(pack({"a": 1}) + b"\x01", LIMIT)


def test_unpack_refuses_oversize_body() -> None:
    body = pack({"data": b"\x00" * 1000})
    assert unpack(body, len(body)) == {"data": b"\x00" * 1000}
    with pytest.raises(DecodeError, match="exceeds"):
        unpack(body, len(body) - 1)


def test_unpack_refuses_ext_type() -> None:
    body = msgpack.packb({"x": msgpack.ExtType(5, b"x")}, use_bin_type=True)
    with pytest.raises(DecodeError, match="ext type 5"):
        unpack(body, LIMIT)


def test_unpack_refuses_top_level_ext_type() -> None:
    with pytest.raises(DecodeError):
        unpack(msgpack.packb(msgpack.ExtType(1, b"abc")), LIMIT)


@pytest.mark.parametrize("key", [1, 1.5, None, True])
def test_unpack_refuses_non_string_map_key(key: object) -> None:
    body = msgpack.packb({key: 1}, use_bin_type=True, strict_types=False)
    with pytest.raises(DecodeError):
        unpack(body, LIMIT)


def test_unpack_refuses_binary_map_key() -> None:
    # msgpack's strict_map_key lets bytes keys through; sagmq maps are keyed by strings.
    body = msgpack.packb({b"k": 1}, use_bin_type=True)
    with pytest.raises(DecodeError):
        unpack(body, LIMIT)


def test_unpack_refuses_nested_non_string_map_key() -> None:
    body = msgpack.packb({"data": {7: b"x"}}, use_bin_type=True)
    with pytest.raises(DecodeError):
        unpack(body, LIMIT)


def test_unpack_refuses_pickle_payload() -> None:
    body = pickle.dumps(np.arange(10, dtype=np.float32))
    with pytest.raises(DecodeError):
        unpack(body, LIMIT)


def test_unpack_of_pickle_payload_never_unpickles(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("pickle was called")

    monkeypatch.setattr(pickle, "loads", boom)
    with pytest.raises(DecodeError):
        unpack(pickle.dumps({"a": np.zeros(3)}), LIMIT)


def test_pack_refuses_unencodable() -> None:
    with pytest.raises(DecodeError):
        pack({"x": object()})


def test_pack_unpack_plain_structure() -> None:
    obj = {"a": [1, -2, 3.5, None, True, "s", b"\x00\xff"], "b": {"c": {}}}
    assert unpack(pack(obj), LIMIT) == obj


# --- DXO ---------------------------------------------------------------------------------


def test_dxo_roundtrip_with_meta() -> None:
    dxo = DXO(
        WEIGHT_DIFF,
        {"w": np.arange(6, dtype="<f4").reshape(2, 3), "b": np.array([1, 2], dtype="<i8"), "s": np.array([3.0])},
        {"NUM_STEPS_CURRENT_ROUND": 3, "note": "x", "nested": {"l": [1, 2.5, None]}},
    )
    got = decode_dxo(unpack(pack(encode_dxo(dxo)), LIMIT))
    assert got.kind == WEIGHT_DIFF
    assert dict(got.meta) == dict(dxo.meta)
    assert list(got.data) == ["w", "b", "s"]
    for k, v in dxo.data.items():
        assert got.data[k].dtype == v.dtype
        assert got.data[k].shape == v.shape
        np.testing.assert_array_equal(got.data[k], v)
    assert got.nbytes() == dxo.nbytes() == 24 + 16 + 8


def test_dxo_roundtrip_empty() -> None:
    got = decode_dxo(unpack(pack(encode_dxo(DXO(WEIGHTS, {}))), LIMIT))
    assert got.kind == WEIGHTS
    assert dict(got.data) == {}
    assert dict(got.meta) == {}


@pytest.mark.parametrize(
    "obj",
    [
        [],
        {"kind": "WEIGHTS", "data": {}},
        {"kind": "WEIGHTS", "data": {}, "meta": {}, "x": 1},
        {"kind": 1, "data": {}, "meta": {}},
        {"kind": "WEIGHTS", "data": [], "meta": {}},
        {"kind": "WEIGHTS", "data": {}, "meta": []},
        {"kind": "WEIGHTS", "data": {"w": {"dtype": "|O", "shape": [1], "data": b"\x00" * 8}}, "meta": {}},
    ],
)
def test_decode_dxo_refuses_malformed(obj: object) -> None:
    with pytest.raises(DecodeError):
        decode_dxo(obj)


def test_decode_dxo_error_names_the_variable() -> None:
    obj = {"kind": "WEIGHTS", "data": {"layer1": {"dtype": "<U4", "shape": [1], "data": b"\x00" * 16}}, "meta": {}}
    with pytest.raises(DecodeError, match="layer1"):
        decode_dxo(obj)
