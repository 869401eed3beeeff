"""FullModelShareableGenerator: the global model as task data, and a round's aggregate applied to it."""

from __future__ import annotations

import numpy as np
import pytest

from sagmq.server.full_model_shareable_generator import FullModelShareableGenerator, apply_aggregate
from sagmq.wire.codec import DXO, METRICS, WEIGHT_DIFF, WEIGHTS, decode_array, encode_array, pack, unpack
from sagmq.wire.errors import SagmqError


def global_model() -> dict[str, np.ndarray]:
    return {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([1.0, 2.0], dtype=np.float32),
        "bn.running_mean": np.array([5.0, 5.0], dtype=np.float32),
    }


def read_only(a: np.ndarray) -> np.ndarray:
    """An array as it comes off the wire: a read-only view of the message body."""
    return decode_array(unpack(pack(encode_array(a)), 2**20))


def test_weights_replace_only_the_variables_they_carry() -> None:
    g = global_model()
    new_w = np.full((2, 3), 9.0, np.float32)
    out = apply_aggregate(g, DXO(WEIGHTS, {"w": new_w, "b": np.array([7.0, 8.0], np.float32)}))
    np.testing.assert_array_equal(out["w"], new_w)
    np.testing.assert_array_equal(out["b"], [7.0, 8.0])
    np.testing.assert_array_equal(out["bn.running_mean"], [5.0, 5.0])  # not carried: kept
    assert set(out) == set(g)


def test_weights_results_are_writable_copies_of_read_only_views() -> None:
    g = global_model()
    agg = {"w": read_only(np.full((2, 3), 3.0, np.float32))}
    assert not agg["w"].flags.writeable
    out = apply_aggregate(g, DXO(WEIGHTS, agg))
    assert out["w"].flags.writeable
    assert out["w"].flags.owndata
    assert not np.shares_memory(out["w"], agg["w"])
    out["w"][0, 0] = -1.0
    assert agg["w"][0, 0] == 3.0


def test_weights_do_not_mutate_the_input_model() -> None:
    g = global_model()
    before = {k: v.copy() for k, v in g.items()}
    out = apply_aggregate(g, DXO(WEIGHTS, {"w": np.zeros((2, 3), np.float32)}))
    assert out is not g
    for k, v in before.items():
        np.testing.assert_array_equal(g[k], v)


def test_weight_diff_adds_as_nvflare_without_casting_back() -> None:
    g = global_model()
    diff = {"w": np.full((2, 3), 0.5, np.float32), "b": np.array([1.0, -1.0], np.float64)}
    out = apply_aggregate(g, DXO(WEIGHT_DIFF, diff))
    np.testing.assert_allclose(out["w"], np.arange(6, dtype=np.float32).reshape(2, 3) + 0.5)
    np.testing.assert_allclose(out["b"], [2.0, 1.0])
    assert out["w"].dtype == np.float32
    assert out["b"].dtype == np.float64  # NVFlare's weights[k] + v: a float64 diff promotes, no cast back
    np.testing.assert_array_equal(out["bn.running_mean"], [5.0, 5.0])


def test_weight_diff_result_is_writable_and_input_untouched() -> None:
    g = global_model()
    out = apply_aggregate(g, DXO(WEIGHT_DIFF, {"b": read_only(np.array([1.0, 1.0], np.float32))}))
    assert out["b"].flags.writeable
    np.testing.assert_array_equal(g["b"], [1.0, 2.0])


def test_weight_diff_with_unknown_variable_raises() -> None:
    with pytest.raises(SagmqError, match="'extra'"):
        apply_aggregate(global_model(), DXO(WEIGHT_DIFF, {"extra": np.zeros(2, np.float32)}))


def test_none_aggregate_returns_global_unchanged() -> None:
    g = global_model()
    out = apply_aggregate(g, None)
    assert set(out) == set(g)
    for k in g:
        assert out[k] is g[k]


@pytest.mark.parametrize("kind", [WEIGHTS, WEIGHT_DIFF, METRICS])
def test_empty_aggregate_returns_global_unchanged(kind: str) -> None:
    g = global_model()
    out = apply_aggregate(g, DXO(kind, {}))
    assert set(out) == set(g)
    for k in g:
        assert out[k] is g[k]


def test_metrics_aggregate_raises() -> None:
    with pytest.raises(SagmqError, match="METRICS"):
        apply_aggregate(global_model(), DXO(METRICS, {"acc": np.array([0.9])}))


def test_unknown_kind_raises() -> None:
    with pytest.raises(SagmqError):
        apply_aggregate(global_model(), DXO("FOO", {"w": np.zeros((2, 3), np.float32)}))


# --- the component ------------------------------------------------------------------------------


def test_learnable_to_shareable_is_the_whole_model_as_weights_with_the_meta() -> None:
    g = global_model()
    dxo = FullModelShareableGenerator().learnable_to_shareable(g, {"current_round": 3, "num_rounds": 5})
    assert dxo.kind == WEIGHTS
    assert dxo.meta == {"current_round": 3, "num_rounds": 5}
    assert set(dxo.data) == set(g)
    for k in g:
        assert dxo.data[k] is g[k]  # the task shares the arrays: no copy of a large model


def test_learnable_to_shareable_without_meta() -> None:
    assert FullModelShareableGenerator().learnable_to_shareable(global_model()).meta == {}


def test_shareable_to_learnable_applies_the_aggregate() -> None:
    g = global_model()
    out = FullModelShareableGenerator().shareable_to_learnable(DXO(WEIGHT_DIFF, {"b": np.ones(2, np.float32)}), g)
    np.testing.assert_array_equal(out["b"], [2.0, 3.0])
    np.testing.assert_array_equal(g["b"], [1.0, 2.0])


def test_shareable_to_learnable_of_nothing_keeps_the_model() -> None:
    g = global_model()
    assert FullModelShareableGenerator().shareable_to_learnable(None, g) is g


def test_weight_diff_on_an_integer_model_gives_floats() -> None:
    out = apply_aggregate({"n": np.array([1, 2], np.int64)}, DXO(WEIGHT_DIFF, {"n": np.array([0.5, 0.25])}))
    assert out["n"].dtype == np.float64
    np.testing.assert_array_equal(out["n"], [1.5, 2.25])
