"""InTimeAccumulateWeightedAggregator: its math, checks and memory, whole and streamed, with no broker."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest

from sagmq.aggregator.intime_accumulate_weighted_aggregator import (
    NUM_STEPS,
    SCRATCH_ELEMENTS,
    InTimeAccumulateWeightedAggregator,
    VarSpec,
    read_stream_header,
    sum_dtype,
)
from sagmq.wire.blob import H_PARTS, H_SIZE, Part, split
from sagmq.wire.codec import DXO, METRICS, WEIGHT_DIFF, WEIGHTS, encode_dxo, unpack
from sagmq.wire.errors import DecodeError, Rejected
from sagmq.wire.messages import RC_EXECUTION_EXCEPTION, RC_OK

SITES = ("a", "b", "c")
AGG_W = {"a": 1.0, "b": 2.0, "c": 0.5}
STEPS = {"a": 1, "b": 3, "c": 2}


def make(kind: str = WEIGHT_DIFF, targets: tuple[str, ...] = SITES, spec: dict[str, VarSpec] | None = None,
         weights: dict[str, float] | None = None, exclude: str = "",
         by_iter: bool = True) -> InTimeAccumulateWeightedAggregator:
    return InTimeAccumulateWeightedAggregator(kind, AGG_W if weights is None else weights, exclude, by_iter,
                                              targets=targets, spec=spec)


def spec_of(model: dict[str, np.ndarray]) -> dict[str, VarSpec]:
    return {k: VarSpec(v.dtype.str, tuple(v.shape)) for k, v in model.items()}


def dxo(kind: str, data: dict[str, np.ndarray], steps: object = None) -> DXO:
    return DXO(kind, data, {} if steps is None else {NUM_STEPS: steps})


# --- the formula -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [WEIGHT_DIFF, WEIGHTS])
def test_weighted_average_of_three_sites(kind: str) -> None:
    rng = np.random.default_rng(1234)
    data = {s: {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
            for s in SITES}
    model = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(5, np.float32)}
    acc = make(kind, spec=spec_of(model))
    for s in SITES:
        acc.accept(s, RC_OK, dxo(kind, data[s], STEPS[s]))
    out = acc.aggregate()
    assert out is not None
    assert out.kind == kind
    assert acc.accepted == list(SITES)
    w = [AGG_W[s] * STEPS[s] for s in SITES]  # 1, 6, 1
    for var in ("w", "b"):
        want = np.average(np.stack([data[s][var].astype(np.float64) for s in SITES]), axis=0, weights=w)
        np.testing.assert_allclose(out.data[var], want, rtol=1e-6, atol=1e-7)
        assert out.data[var].dtype == np.float32


def test_fixed_vectors_against_float64_hand_computation() -> None:
    vecs = {"a": [1.0, 2.0, 3.0, 4.0], "b": [10.0, 20.0, 30.0, 40.0], "c": [-4.0, 0.0, 4.0, 8.0]}
    acc = make(WEIGHT_DIFF, spec={"x": VarSpec("<f4", (4,))})
    for s in SITES:
        acc.accept(s, RC_OK, dxo(WEIGHT_DIFF, {"x": np.array(vecs[s], np.float32)}, STEPS[s]))
    # weights: a 1*1=1, b 2*3=6, c 0.5*2=1; total 8
    want = [(1 * vecs["a"][i] + 6 * vecs["b"][i] + 1 * vecs["c"][i]) / 8.0 for i in range(4)]
    assert want == [57 / 8, 122 / 8, 187 / 8, 252 / 8] == [7.125, 15.25, 23.375, 31.5]
    out = acc.aggregate()
    assert out is not None
    np.testing.assert_allclose(out.data["x"], np.array(want, np.float64), rtol=1e-6)
    assert acc.weights["x"] == 8.0


def test_default_weight_is_one_and_default_steps_is_one() -> None:
    acc = make(WEIGHTS, targets=("p", "q"), weights={}, spec={"x": VarSpec("<f8", (2,))})
    acc.accept("p", RC_OK, dxo(WEIGHTS, {"x": np.array([0.0, 10.0])}))
    acc.accept("q", RC_OK, dxo(WEIGHTS, {"x": np.array([2.0, 20.0])}))
    out = acc.aggregate()
    assert out is not None
    np.testing.assert_array_equal(out.data["x"], [1.0, 15.0])


def test_hello_numpy_sag_two_sites_give_exactly_the_same_model() -> None:
    trained = np.arange(2, 11, dtype=np.float32).reshape(3, 3)  # [[2..10]]
    acc = make(WEIGHTS, targets=("site-1", "site-2"), weights={"site-1": 1.0, "site-2": 1.0},
               spec={"numpy_key": VarSpec("<f4", (3, 3))})
    for s in ("site-1", "site-2"):
        acc.accept(s, RC_OK, dxo(WEIGHTS, {"numpy_key": trained.copy()}, 1))
    out = acc.aggregate()
    assert out is not None
    assert out.data["numpy_key"].dtype == np.float32
    np.testing.assert_array_equal(out.data["numpy_key"], trained)
    assert out.meta["accepted"] == ["site-1", "site-2"]


def test_per_variable_denominators_when_a_site_omits_a_variable() -> None:
    spec = {"x": VarSpec("<f8", (2,)), "y": VarSpec("<f8", (2,))}
    acc = make(WEIGHT_DIFF, targets=("a", "b"), spec=spec)
    acc.accept("a", RC_OK, dxo(WEIGHT_DIFF, {"x": np.array([1.0, 1.0]), "y": np.array([3.0, 6.0])}, 1))  # w 1
    acc.accept("b", RC_OK, dxo(WEIGHT_DIFF, {"x": np.array([4.0, 7.0])}, 1))  # w 2
    out = acc.aggregate()
    assert out is not None
    np.testing.assert_allclose(out.data["x"], [(1 + 2 * 4) / 3, (1 + 2 * 7) / 3])
    np.testing.assert_allclose(out.data["y"], [3.0, 6.0])  # only a's weight in y's denominator
    assert acc.weights == {"x": 3.0, "y": 1.0}


def test_exclude_vars_skips_matching_variables() -> None:
    spec = {"conv.weight": VarSpec("<f4", (2,)), "bn.running_mean": VarSpec("<f4", (2,))}
    acc = make(WEIGHT_DIFF, targets=("a", "b"), spec=spec, exclude=r"running_")
    for s, v in (("a", 1.0), ("b", 3.0)):
        acc.accept(s, RC_OK, dxo(WEIGHT_DIFF, {"conv.weight": np.full(2, v, np.float32),
                                               "bn.running_mean": np.full(2, np.float32(100.0))}, 1))
    out = acc.aggregate()
    assert out is not None
    assert set(out.data) == {"conv.weight"}
    assert "bn.running_mean" not in acc.sums
    np.testing.assert_allclose(out.data["conv.weight"], [(1 + 2 * 3) / 3] * 2, rtol=1e-6)


def test_exclude_vars_does_not_check_excluded_variables() -> None:
    # An excluded variable is skipped before its shape or values are looked at.
    acc = make(WEIGHT_DIFF, targets=("a",), spec={"x": VarSpec("<f4", (2,))}, exclude="^skip")
    acc.accept("a", RC_OK, dxo(WEIGHT_DIFF, {"x": np.ones(2, np.float32), "skip_me": np.array([np.nan])}, 1))
    assert acc.accepted == ["a"]


def test_weigh_by_local_iter_false_sums_unweighted_but_divides_by_weights() -> None:
    acc = make(WEIGHT_DIFF, targets=("a", "b"), weights={"a": 1.0, "b": 100.0},
               spec={"x": VarSpec("<f8", (1,))}, by_iter=False)
    acc.accept("a", RC_OK, dxo(WEIGHT_DIFF, {"x": np.array([2.0])}, 1))
    acc.accept("b", RC_OK, dxo(WEIGHT_DIFF, {"x": np.array([4.0])}, 1))
    out = acc.aggregate()
    assert out is not None
    np.testing.assert_allclose(out.data["x"], [(2 + 4) / (1 + 100)], rtol=1e-12)


def test_zero_steps_contribution_is_accepted_but_weighs_nothing() -> None:
    acc = make(WEIGHT_DIFF, targets=("a", "b"), spec={"x": VarSpec("<f8", (1,))})
    acc.accept("a", RC_OK, dxo(WEIGHT_DIFF, {"x": np.array([2.0])}, 0))
    acc.accept("b", RC_OK, dxo(WEIGHT_DIFF, {"x": np.array([5.0])}, 1))
    out = acc.aggregate()
    assert out is not None
    np.testing.assert_allclose(out.data["x"], [5.0])


def test_float_steps_are_allowed() -> None:
    acc = make(WEIGHT_DIFF, targets=("a", "b"), weights={}, spec={"x": VarSpec("<f8", (1,))})
    acc.accept("a", RC_OK, dxo(WEIGHT_DIFF, {"x": np.array([1.0])}, 0.5))
    acc.accept("b", RC_OK, dxo(WEIGHT_DIFF, {"x": np.array([4.0])}, 1.5))
    out = acc.aggregate()
    assert out is not None
    np.testing.assert_allclose(out.data["x"], [(0.5 + 6.0) / 2.0])


def test_integer_contributions_to_an_integer_model_average_to_floats_as_nvflare() -> None:
    # NVFlare: total = v * 1.0 summed, then total * (1.0 / count): int64 [1,2], [4,6] -> float64 [2.5, 4.0]
    acc = make(WEIGHTS, targets=("a", "b"), weights={}, spec={"n": VarSpec("<i8", (2,))})
    acc.accept("a", RC_OK, dxo(WEIGHTS, {"n": np.array([1, 2], np.int64)}, 1))
    acc.accept("b", RC_OK, dxo(WEIGHTS, {"n": np.array([4, 6], np.int64)}, 1))
    assert acc.sums["n"].dtype == np.float64
    out = acc.aggregate()
    assert out is not None
    assert out.data["n"].dtype == np.float64
    np.testing.assert_array_equal(out.data["n"], [2.5, 4.0])


# --- rejections ---------------------------------------------------------------------------


X_SPEC = {"x": VarSpec("<f4", (3,)), "y": VarSpec("<f4", (2,))}


def ok_data() -> dict[str, np.ndarray]:
    return {"x": np.ones(3, np.float32), "y": np.ones(2, np.float32)}


def test_reject_rc_not_ok() -> None:
    acc = make(spec=X_SPEC)
    with pytest.raises(Rejected) as e:
        acc.accept("a", RC_EXECUTION_EXCEPTION, dxo(WEIGHT_DIFF, ok_data(), 1), "it crashed")
    assert RC_EXECUTION_EXCEPTION in e.value.reason
    assert "it crashed" in e.value.reason
    assert acc.accepted == []


def test_reject_site_not_in_targets() -> None:
    acc = make(spec=X_SPEC)
    with pytest.raises(Rejected, match="not a target") as e:
        acc.accept("mallory", RC_OK, dxo(WEIGHT_DIFF, ok_data(), 1))
    assert "mallory" in e.value.reason


def test_reject_duplicate_site() -> None:
    acc = make(spec=X_SPEC)
    acc.accept("a", RC_OK, dxo(WEIGHT_DIFF, ok_data(), 1))
    before = {k: v.copy() for k, v in acc.sums.items()}
    with pytest.raises(Rejected, match="duplicate"):
        acc.accept("a", RC_OK, dxo(WEIGHT_DIFF, ok_data(), 1))
    assert acc.accepted == ["a"]
    for k, v in before.items():
        np.testing.assert_array_equal(acc.sums[k], v)


def test_a_rejected_site_may_still_contribute_later() -> None:
    acc = make(spec=X_SPEC)
    with pytest.raises(Rejected):
        acc.accept("a", RC_OK, dxo(WEIGHT_DIFF, {"x": np.full(3, np.nan, np.float32)}, 1))
    acc.accept("a", RC_OK, dxo(WEIGHT_DIFF, ok_data(), 1))
    assert acc.accepted == ["a"]


def test_reject_missing_dxo() -> None:
    with pytest.raises(Rejected, match="no DXO"):
        make(spec=X_SPEC).accept("a", RC_OK, None)


def test_reject_wrong_kind() -> None:
    acc = make(WEIGHTS, spec=X_SPEC)
    with pytest.raises(Rejected, match="expected data kind WEIGHTS but got WEIGHT_DIFF"):
        acc.accept("a", RC_OK, dxo(WEIGHT_DIFF, ok_data(), 1))


def test_reject_metrics_when_weights_expected() -> None:
    with pytest.raises(Rejected, match="expected data kind"):
        make(WEIGHTS, spec=X_SPEC).accept("a", RC_OK, dxo(METRICS, ok_data(), 1))


def test_reject_unknown_kind() -> None:
    with pytest.raises(Rejected, match="cannot handle data kind 'FOO'"):
        make(spec=X_SPEC).accept("a", RC_OK, dxo("FOO", ok_data(), 1))


@pytest.mark.parametrize("steps", [-1, -0.5, float("nan"), float("inf"), "x", "-2", [1], {}])
def test_reject_bad_num_steps(steps: object) -> None:
    acc = make(spec=X_SPEC)
    d = DXO(WEIGHT_DIFF, ok_data(), {NUM_STEPS: steps})
    with pytest.raises(Rejected, match=NUM_STEPS):
        acc.accept("a", RC_OK, d)
    assert acc.accepted == [] and acc.sums == {}


@pytest.mark.parametrize(("steps", "weight"), [("3", 3.0), ("0.5", 0.5), (True, 1.0), (None, 1.0), (2, 2.0)])
def test_num_steps_is_read_with_float_as_nvflare(steps: object, weight: float) -> None:
    acc = make(spec=X_SPEC)
    acc.accept("a", RC_OK, DXO(WEIGHT_DIFF, ok_data(), {NUM_STEPS: steps}))
    assert acc.weights["x"] == weight


def test_a_variable_not_in_the_global_model_is_aggregated_as_nvflare() -> None:
    acc = make(WEIGHTS, targets=("a", "b"), weights={}, spec=X_SPEC)
    for site, z in (("a", 1.0), ("b", 3.0)):
        data = ok_data()
        data["z"] = np.full(2, z, np.float32)
        acc.accept(site, RC_OK, dxo(WEIGHTS, data, 1))
    out = acc.aggregate()
    assert out is not None
    np.testing.assert_array_equal(out.data["z"], [2.0, 2.0])


def test_a_new_variable_must_keep_its_shape() -> None:
    acc = make(WEIGHTS, targets=("a", "b"), spec=X_SPEC)
    acc.accept("a", RC_OK, dxo(WEIGHTS, {"z": np.ones(2, np.float32)}, 1))
    with pytest.raises(Rejected, match=r"'z' has shape \(3,\), an earlier contribution had \(2,\)"):
        acc.accept("b", RC_OK, dxo(WEIGHTS, {"z": np.ones(3, np.float32)}, 1))


@pytest.mark.parametrize("shape", [(2,), (3, 1), (1, 3), (), (4,)])
def test_reject_wrong_shape(shape: tuple[int, ...]) -> None:
    data = ok_data()
    data["x"] = np.ones(shape, np.float32)
    with pytest.raises(Rejected, match="'x' has shape"):
        make(spec=X_SPEC).accept("a", RC_OK, dxo(WEIGHT_DIFF, data, 1))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_reject_nan_or_inf(bad: float) -> None:
    data = ok_data()
    data["x"] = np.array([1.0, bad, 2.0], np.float32)
    with pytest.raises(Rejected, match="NaN or Inf"):
        make(spec=X_SPEC).accept("a", RC_OK, dxo(WEIGHT_DIFF, data, 1))


@pytest.mark.parametrize("arr", [np.array(["a"]), np.array([b"a"]), np.array([object()], dtype=object),
                                 np.array([True]), np.array([1 + 1j])])
def test_reject_non_numeric_dtype(arr: np.ndarray) -> None:
    acc = make(spec={"s": VarSpec("<f4", (1,))})
    with pytest.raises(Rejected, match="non-numeric dtype"):
        acc.accept("a", RC_OK, dxo(WEIGHT_DIFF, {"s": arr}, 1))


def test_an_empty_contribution_is_accepted_and_counted_as_nvflare() -> None:
    acc = make(spec=X_SPEC)
    acc.accept("a", RC_OK, dxo(WEIGHT_DIFF, {}, 1))
    acc.accept("b", RC_OK, dxo(WEIGHT_DIFF, {"x": np.full(3, 2.0, np.float32)}, 1))
    out = acc.aggregate()
    assert out is not None and acc.accepted == ["a", "b"]
    np.testing.assert_array_equal(out.data["x"], [2.0] * 3)  # the empty one weighs nothing for x


def test_a_contribution_whose_every_variable_is_excluded_is_accepted() -> None:
    acc = make(spec=X_SPEC, exclude=".")
    acc.accept("a", RC_OK, dxo(WEIGHT_DIFF, ok_data(), 1))
    out = acc.aggregate()
    assert out is not None and out.data == {} and acc.accepted == ["a"]


def test_all_zero_weights_keep_the_global_value_and_say_so() -> None:
    acc = make(spec=X_SPEC, weights={"a": 0.0, "b": 0.0})
    acc.accept("a", RC_OK, dxo(WEIGHT_DIFF, ok_data(), 1))
    out = acc.aggregate()
    assert out is not None and "x" not in out.data
    assert any("'x'" in n and "departure from NVFlare" in n for n in acc.notes)


@pytest.mark.parametrize(
    "second",
    [np.array([np.nan, 1.0], np.float32), np.ones(3, np.float32), np.array(["a", "b"])],
    ids=["nan", "shape", "dtype"],
)
def test_a_contribution_with_a_bad_second_variable_leaves_the_sums_unchanged(second: np.ndarray) -> None:
    acc = make(spec=X_SPEC)
    acc.accept("a", RC_OK, dxo(WEIGHT_DIFF, {"x": np.full(3, 2.0, np.float32), "y": np.full(2, 3.0, np.float32)}, 1))
    sums_before = {k: v.copy() for k, v in acc.sums.items()}
    weights_before = dict(acc.weights)
    bad = {"x": np.full(3, 1000.0, np.float32), "y": second}  # x is fine, y is not
    assert list(bad) == ["x", "y"]
    with pytest.raises(Rejected):
        acc.accept("b", RC_OK, dxo(WEIGHT_DIFF, bad, 1))
    assert set(acc.sums) == set(sums_before)
    for k, v in sums_before.items():
        np.testing.assert_array_equal(acc.sums[k], v)
    assert acc.weights == weights_before
    assert acc.accepted == ["a"]


# --- memory and result ---------------------------------------------------------------------------


def test_memory_is_one_model_whatever_the_number_of_sites() -> None:
    model = {"w": np.zeros(600, np.float32), "b": np.zeros(400, np.float32)}
    model_bytes = sum(v.nbytes for v in model.values())
    assert model_bytes == 4000
    sites = tuple(f"site-{i}" for i in range(50))
    acc = make(WEIGHT_DIFF, targets=sites, weights={}, spec=spec_of(model))
    rng = np.random.default_rng(0)
    for i, s in enumerate(sites):
        acc.accept(s, RC_OK, dxo(WEIGHT_DIFF, {k: rng.normal(size=v.shape).astype(np.float32)
                                               for k, v in model.items()}, 1))
        assert sum(a.nbytes for a in acc.sums.values()) == model_bytes, f"after {i + 1} contributions"
    assert len(acc.accepted) == 50
    assert set(acc.sums) == set(model)
    assert all(type(a) is np.ndarray for a in acc.sums.values())
    assert sum(a.nbytes for a in acc.sums.values()) == model_bytes


def test_sums_are_updated_in_place() -> None:
    acc = make(spec=X_SPEC)
    acc.accept("a", RC_OK, dxo(WEIGHT_DIFF, ok_data(), 1))
    ids = {k: id(v) for k, v in acc.sums.items()}
    acc.accept("b", RC_OK, dxo(WEIGHT_DIFF, ok_data(), 1))
    assert {k: id(v) for k, v in acc.sums.items()} == ids


def test_result_is_none_when_nothing_was_accepted() -> None:
    acc = make(spec=X_SPEC)
    assert acc.aggregate() is None
    with pytest.raises(Rejected):
        acc.accept("a", RC_EXECUTION_EXCEPTION, None)
    with pytest.raises(Rejected):
        acc.accept("zz", RC_OK, dxo(WEIGHT_DIFF, ok_data(), 1))
    assert acc.aggregate() is None


def test_a_float64_contribution_to_a_float32_model_keeps_float64_as_nvflare() -> None:
    acc = make(WEIGHTS, spec=X_SPEC)
    acc.accept("a", RC_OK, dxo(WEIGHTS, ok_data(), 1))
    acc.accept("b", RC_OK, dxo(WEIGHTS, {"x": np.full(3, 2.0), "y": np.full(2, 2.0)}, 1))
    out = acc.aggregate()
    assert out is not None
    for k in X_SPEC:
        assert out.data[k].dtype == np.float64
    # NVFlare: float32 v * 1.0 (float32) + float64 v * 2.0, times (1.0 / 3)
    want = (ok_data()["x"] * 1.0 + np.full(3, 2.0) * 2.0) * (1.0 / 3)
    np.testing.assert_array_equal(out.data["x"], want)


def test_float32_contributions_give_float32_whatever_the_model_dtype() -> None:
    acc = make(WEIGHTS, spec={"x": VarSpec("<f8", (2,))})
    acc.accept("a", RC_OK, dxo(WEIGHTS, {"x": np.array([1.0, 2.0], np.float32)}, 1))
    out = acc.aggregate()
    assert out is not None
    assert out.data["x"].dtype == np.float32


def test_mixed_int_and_float32_contributions_average_in_float64() -> None:
    acc = make(WEIGHTS, targets=("a", "b"), weights={}, spec={"x": VarSpec("<f4", (2,))})
    acc.accept("a", RC_OK, dxo(WEIGHTS, {"x": np.array([1.5, 2.5], np.float32)}, 1))
    acc.accept("b", RC_OK, dxo(WEIGHTS, {"x": np.array([4, 6], np.int32)}, 1))
    out = acc.aggregate()
    assert out is not None
    assert out.data["x"].dtype == np.float64
    np.testing.assert_array_equal(out.data["x"], [2.75, 4.25])


def test_result_meta_lists_accepted_sites_in_order() -> None:
    acc = make(spec=X_SPEC)
    for s in ("c", "a"):
        acc.accept(s, RC_OK, dxo(WEIGHT_DIFF, ok_data(), 1))
    out = acc.aggregate()
    assert out is not None
    assert out.meta["accepted"] == ["c", "a"]


# --- streamed contributions (add_part) ------------------------------------------------------------

CHUNK = 64  # bytes per data part: a few parts per variable


def blob_parts(data: dict[str, np.ndarray], steps: object = 1, kind: str = WEIGHT_DIFF) -> list[Part]:
    """A contribution as the parts a site sends it in (part 0 the header, then the data parts)."""
    return list(split({"dxo": encode_dxo(dxo(kind, data, steps))}, CHUNK, blob="b"))


def begin(acc: InTimeAccumulateWeightedAggregator, site: str, parts: list[Part], blob: str = "b") -> bool:
    """Open a stream from its header part; True if that alone completed it."""
    h = parts[0].headers
    header = read_stream_header(unpack(parts[0].body, 2**20)["dxo"], h[H_PARTS], h[H_SIZE])
    return acc.begin_stream(blob, site, RC_OK, header).complete


def stream_data() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return {s: {"x": rng.normal(size=30).astype(np.float32), "y": rng.normal(size=(5, 4)).astype(np.float32)}
            for s in ("a", "b")}


STREAM_SPEC = {"x": VarSpec("<f4", (30,)), "y": VarSpec("<f4", (5, 4))}


def test_a_streamed_contribution_in_any_order_equals_a_whole_one() -> None:
    data = stream_data()
    whole, streamed = make(spec=STREAM_SPEC, targets=("a", "b")), make(spec=STREAM_SPEC, targets=("a", "b"))
    for s in ("a", "b"):
        whole.accept(s, RC_OK, dxo(WEIGHT_DIFF, data[s], STEPS[s]))
    for s in ("a", "b"):
        parts = blob_parts(data[s], STEPS[s])
        assert len(parts) > 4
        assert not begin(streamed, s, parts, blob=s)
        order = list(range(1, len(parts)))[::-1] if s == "a" else [*range(2, len(parts)), 1]
        done = [streamed.add_part(s, i, parts[i].headers, parts[i].body).complete for i in order]
        assert done == [False] * (len(order) - 1) + [True]
        assert not streamed.streaming(s)
    assert streamed.accepted == ["a", "b"]
    a, b = whole.aggregate(), streamed.aggregate()
    assert a is not None and b is not None
    for k in STREAM_SPEC:
        np.testing.assert_allclose(b.data[k], a.data[k], rtol=1e-6)


def test_a_duplicate_part_is_ignored() -> None:
    parts = blob_parts({"x": np.full(30, 2.0, np.float32), "y": np.ones((5, 4), np.float32)})
    acc = make(WEIGHT_DIFF, targets=("a",), spec=STREAM_SPEC)
    begin(acc, "a", parts)
    assert acc.add_part("b", 1, parts[1].headers, parts[1].body).duplicate is False
    again = acc.add_part("b", 1, parts[1].headers, parts[1].body)
    assert again.duplicate and not again.complete
    assert acc.add_part("b", 0, parts[0].headers, parts[0].body).duplicate  # the header again
    for i in range(2, len(parts)):
        last = acc.add_part("b", i, parts[i].headers, parts[i].body)
    assert last.complete
    out = acc.aggregate()
    assert out is not None
    np.testing.assert_array_equal(out.data["x"], np.full(30, 2.0, np.float32))  # added once, not twice


def test_a_bad_checksum_refuses_the_stream_and_spoils_the_sums_once_values_were_added() -> None:
    parts = blob_parts({"x": np.ones(30, np.float32), "y": np.ones((5, 4), np.float32)})
    acc = make(targets=("a",), spec=STREAM_SPEC)
    begin(acc, "a", parts)
    acc.add_part("b", 1, parts[1].headers, parts[1].body)
    bad = parts[2].body[:-1] + bytes([parts[2].body[-1] ^ 1])
    with pytest.raises(Rejected, match="checksum mismatch"):
        acc.add_part("b", 2, parts[2].headers, bad)
    assert not acc.streaming("b") and acc.spoiled and acc.accepted == []


def test_a_bad_first_data_part_refuses_the_stream_without_spoiling() -> None:
    parts = blob_parts({"x": np.full(30, np.nan, np.float32), "y": np.ones((5, 4), np.float32)})
    acc = make(targets=("a",), spec=STREAM_SPEC)
    begin(acc, "a", parts)
    with pytest.raises(Rejected, match="NaN or Inf"):
        acc.add_part("b", 1, parts[1].headers, parts[1].body)
    assert not acc.streaming("b") and not acc.spoiled
    assert acc.drop_stream("b") is False  # already gone


def test_a_stream_header_is_checked_like_a_whole_contribution() -> None:
    acc = make(WEIGHTS, targets=("a",), spec=STREAM_SPEC)
    with pytest.raises(Rejected, match="expected data kind WEIGHTS"):
        begin(acc, "a", blob_parts({"x": np.ones(30, np.float32)}))
    with pytest.raises(Rejected, match="not a target"):
        begin(acc, "zz", blob_parts({"x": np.ones(30, np.float32)}, kind=WEIGHTS))
    assert not acc.streaming("b")


def test_a_site_streaming_a_result_cannot_send_another() -> None:
    acc = make(targets=("a",), spec=STREAM_SPEC)
    begin(acc, "a", blob_parts({"x": np.ones(30, np.float32)}), blob="one")
    with pytest.raises(Rejected, match="already sending"):
        acc.accept("a", RC_OK, dxo(WEIGHT_DIFF, {"x": np.ones(30, np.float32)}, 1))
    with pytest.raises(Rejected, match="already sending"):
        begin(acc, "a", blob_parts({"x": np.ones(30, np.float32)}), blob="two")


def test_a_stream_with_no_part_for_the_timeout_is_stale() -> None:
    parts = blob_parts({"x": np.ones(30, np.float32), "y": np.ones((5, 4), np.float32)})
    acc = make(targets=("a",), spec=STREAM_SPEC)
    begin(acc, "a", parts)
    acc.add_part("b", 2, parts[2].headers, parts[2].body)
    now = time.monotonic()
    assert acc.stale_streams(now, 30.0) == {}
    stale = acc.stale_streams(now + 31.0, 30.0)
    assert list(stale) == ["b"]
    assert len(parts) == 5  # the header and 200 bytes in 64-byte parts
    assert stale["b"] == "parts [1, 3, 4] of 5 missing after 30 s"


def test_a_malformed_stream_header_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="kind, data and meta"):
        read_stream_header({"kind": WEIGHTS, "data": {}}, 2, 8)
    with pytest.raises(DecodeError, match="does not fit"):
        read_stream_header({"kind": WEIGHTS, "meta": {},
                            "data": {"x": {"dtype": "<f4", "shape": [3], "blob": [0, 12]}}}, 2, 8)


def test_streaming_memory_is_one_model() -> None:
    acc = make(targets=tuple(f"s{i}" for i in range(20)), weights={}, spec=STREAM_SPEC)
    for i in range(20):
        parts = blob_parts({"x": np.ones(30, np.float32), "y": np.ones((5, 4), np.float32)})
        begin(acc, f"s{i}", parts, blob=f"b{i}")
        for j in range(1, len(parts)):
            acc.add_part(f"b{i}", j, parts[j].headers, parts[j].body)
    assert sum(a.nbytes for a in acc.sums.values()) == 30 * 4 + 20 * 4
    assert len(acc.accepted) == 20


def test_streamed_integer_and_float64_contributions_average_as_nvflare() -> None:
    """The part-by-part path does NVFlare's arithmetic too: int64 averages to float64, float64 stays."""
    data = {"a": {"n": np.arange(40, dtype=np.int64), "f": np.full(20, 0.1)},
            "b": {"n": np.arange(40, dtype=np.int64) + 3, "f": np.full(20, 0.4)}}
    spec = {"n": VarSpec("<i8", (40,)), "f": VarSpec("<f4", (20,))}
    acc = make(WEIGHTS, targets=("a", "b"), weights={}, spec=spec)
    for s in ("a", "b"):
        parts = blob_parts(data[s], 1, WEIGHTS)
        assert len(parts) > 4
        begin(acc, s, parts, blob=s)
        for i in range(1, len(parts)):
            acc.add_part(s, i, parts[i].headers, parts[i].body)
    out = acc.aggregate()
    assert out is not None and acc.accepted == ["a", "b"]
    assert out.data["n"].dtype == np.float64 and out.data["f"].dtype == np.float64
    np.testing.assert_array_equal(out.data["n"], (np.arange(40) * 2 + 3) * 0.5)
    np.testing.assert_array_equal(out.data["f"], (np.full(20, 0.1) + np.full(20, 0.4)) * (1.0 / 2))


# --- no model-sized temporary: the scratch buffer gives NVFlare's bits ----------------------


def old_sum(contribs: list[tuple[np.ndarray, float]], by_iter: bool) -> np.ndarray:
    """The sums as ``acc += v * weight`` (or ``acc += v``) made them, widening as _sum does."""
    acc: np.ndarray | None = None
    for v, w in contribs:
        dt = sum_dtype(v.dtype)
        if acc is None:
            acc = np.zeros(v.shape, dtype=dt)
        elif np.result_type(acc.dtype, dt) != acc.dtype:
            acc = acc.astype(np.result_type(acc.dtype, dt))
        if by_iter:
            acc += v * dt.type(w)
        else:
            acc += v
    assert acc is not None
    return acc


@pytest.mark.parametrize("by_iter", [True, False])
@pytest.mark.parametrize("dtypes", [("<f2",), ("<f4",), ("<f8",), ("<i8",), ("|i1", "<u4"), ("<f4", "<f8", "<f4"),
                                    ("<i4", "<f4"), ("<f2", "<f4")])
def test_weighted_adds_are_bit_identical_to_v_times_weight(dtypes: tuple[str, ...], by_iter: bool) -> None:
    # longer than the scratch buffer and not a multiple of it, so slices and the tail are both used
    n = 2 * SCRATCH_ELEMENTS + 12345
    rng = np.random.default_rng(7)
    sites = tuple(f"s{i}" for i in range(len(dtypes)))
    weights = {s: float(w) for s, w in zip(sites, (0.1, 2.0 / 3.0, 1e-3, 7.25))}
    steps = {s: k for s, k in zip(sites, (3, 1, 17, 2))}
    acc = make(WEIGHTS, targets=sites, weights=weights, by_iter=by_iter)
    contribs = []
    for s, dt in zip(sites, dtypes):
        kind = np.dtype(dt).kind
        v = (rng.normal(scale=100.0, size=n) if kind == "f" else rng.integers(0, 100, size=n)).astype(dt)
        acc.accept(s, RC_OK, dxo(WEIGHTS, {"x": v}, steps[s]))
        contribs.append((v, weights[s] * steps[s]))
    want = old_sum(contribs, by_iter)
    got = acc.sums["x"]
    assert got.dtype == want.dtype
    assert got.tobytes() == want.tobytes()


def test_a_weighted_add_allocates_no_model_sized_temporary() -> None:
    n = 1_000_000  # a 4 MB float32 model
    acc = make(WEIGHTS, targets=("a", "b"), weights={"a": 0.3, "b": 0.7})
    acc.accept("a", RC_OK, dxo(WEIGHTS, {"x": np.ones(n, np.float32)}, 2))
    v = np.full(n, 3.0, np.float32)
    tracemalloc.start()
    try:
        acc.accept("b", RC_OK, dxo(WEIGHTS, {"x": v}, 5))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the old formula made a 4 MB product (and the NaN check a 1 MB mask); the scratch buffer exists already
    assert peak < 64 * 1024, peak
    assert acc.sums["x"][0] == np.float32(0.6) + np.float32(3.0) * np.float32(3.5)


@pytest.mark.parametrize("dtype", ["<f2", "<f4", "<f8"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("at", [0, 77_777, 199_999])
def test_one_nan_or_inf_anywhere_in_a_large_variable_is_refused(dtype: str, bad: float, at: int) -> None:
    v = np.linspace(-5.0, 5.0, 200_000).astype(dtype)
    v[at] = bad
    acc = make(WEIGHTS, targets=("a",), weights={})
    with pytest.raises(Rejected, match="NaN or Inf"):
        acc.accept("a", RC_OK, dxo(WEIGHTS, {"x": v}, 1))
    assert acc.sums == {} and acc.accepted == []
