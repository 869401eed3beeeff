"""NVFlare's collection mode (expected_data_kind as a dict): the wire, the aggregation per key, the server's
merge of a COLLECTION aggregate, the job spec, and filters on sub-DXOs.

The aggregation vectors are NVFlare's own unit-test cases for InTimeAccumulateWeightedAggregator
(its invalid/valid constructor arguments and its random-collection aggregation over 1-3 keys,
two shapes and 10/50/100 clients), rewritten here with a seeded generator and exact expectations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sagmq.aggregator.collection import CollectionAggregator
from sagmq.aggregator.intime_accumulate_weighted_aggregator import (
    InTimeAccumulateWeightedAggregator,
    StreamHeader,
    VarSpec,
    read_stream_header,
)
from sagmq.filters.base import FilterContext
from sagmq.filters.exclude_vars import ExcludeVars
from sagmq.job.collection_spec import CollectionConfigError, KeySettings, resolve_collection
from sagmq.job.spec import parse_job, read_job_folder
from sagmq.server.full_model_shareable_generator import (
    FullModelShareableGenerator,
    apply_aggregate,
    collection_metrics,
)
from sagmq.server.scatter_and_gather import OpenRound, ScatterAndGather
from sagmq.wire.blob import split
from sagmq.wire.codec import (
    COLLECTION,
    DXO,
    METRICS,
    WEIGHT_DIFF,
    WEIGHTS,
    collection,
    decode_dxo,
    encode_dxo,
    pack,
    unpack,
)
from sagmq.wire.errors import DecodeError, JobSpecError, Rejected, SagmqError
from sagmq.wire.messages import RC_OK, ModelLoaded, RoundAggregated, TaskResult, decode

NUM_STEPS = "NUM_STEPS_CURRENT_ROUND"
ROOT = Path(__file__).resolve().parents[2]
SFILE = "app/config/config_fed_server.json"
AGG = "components[2].args"


def _keys(**kinds: str) -> dict[str, KeySettings]:
    return {k: KeySettings(v, {}, "") for k, v in kinds.items()}


# --- the wire ---------------------------------------------------------------------------------

# msgpack of DXO(WEIGHT_DIFF, {w: float32 [0, 1, 2], b: int64 [7]}, {NUM_STEPS: 2}) as sagmq encoded it before
# collections existed (made with the codec of the commit before this feature): a plain DXO must not change
PLAIN_BYTES = bytes.fromhex(
    "83a46b696e64ab5745494748545f44494646a46461746182a17783a56474797065a33c6634a573686170659103a464617461c40c"
    "000000000000803f00000040a16283a56474797065a33c6938a573686170659101a464617461c4080700000000000000a46d6574"
    "6181b74e554d5f53544550535f43555252454e545f524f554e4402")


def test_a_plain_dxo_encodes_byte_for_byte_as_before() -> None:
    d = DXO(WEIGHT_DIFF, {"w": np.arange(3, dtype=np.float32), "b": np.array([7], dtype=np.int64)}, {NUM_STEPS: 2})
    assert pack(encode_dxo(d)) == PLAIN_BYTES
    back = decode_dxo(unpack(PLAIN_BYTES, 2**20))
    assert back.kind == WEIGHT_DIFF and not back.subs and back.data["b"].tolist() == [7]


def test_a_collection_round_trips_through_a_result_message() -> None:
    coll = collection({"model": DXO(WEIGHTS, {"w": np.ones((2, 2), np.float32)}, {NUM_STEPS: 3}),
                       "scores": DXO(METRICS, {"accuracy": np.array(0.75)}, {})}, {"source": "site-1"})
    wire = encode_dxo(coll)
    assert wire["kind"] == COLLECTION and set(wire["data"]) == {"model", "scores"}
    assert wire["data"]["model"]["kind"] == WEIGHTS and wire["data"]["model"]["meta"] == {NUM_STEPS: 3}
    r = TaskResult("j", 0, "train", "t", "site-1", RC_OK, coll)
    back = decode(TaskResult, r.encode(), 2**20).dxo
    assert back is not None and back.kind == COLLECTION and back.data == {} and back.meta == {"source": "site-1"}
    assert back.subs["model"].data["w"].tolist() == [[1, 1], [1, 1]] and back.subs["model"].meta[NUM_STEPS] == 3
    assert float(back.subs["scores"].data["accuracy"]) == 0.75
    assert back.nbytes() == 16 + 8


@pytest.mark.parametrize(("case", "obj", "match"), [
    ("nested collection", {"kind": COLLECTION, "meta": {}, "data": {"a": {"kind": COLLECTION, "meta": {}, "data": {}}}},
     "COLLECTION inside a COLLECTION"),
    ("array beside sub-DXOs", {"kind": COLLECTION, "meta": {}, "data": {
        "w": {"dtype": "<f4", "shape": [1], "data": b"\x00" * 4}}}, "expected a map with kind, data and meta"),
    ("sub-DXO without meta", {"kind": COLLECTION, "meta": {}, "data": {"a": {"kind": WEIGHTS, "data": {}}}},
     "kind, data and meta"),
])
def test_the_decoder_refuses_malformed_collections(case: str, obj: dict[str, Any], match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode_dxo(obj)


def test_the_encoder_refuses_what_cannot_travel() -> None:
    with pytest.raises(DecodeError, match="one level"):
        encode_dxo(collection({"a": collection({})}))
    with pytest.raises(DecodeError, match="only COLLECTION"):
        encode_dxo(DXO(WEIGHTS, {}, {}, {"a": DXO(WEIGHTS, {})}))
    with pytest.raises(DecodeError, match="not arrays"):
        encode_dxo(DXO(COLLECTION, {"w": np.zeros(1)}))


# --- NVFlare's constructor rules (its test_invalid_create / test_create cases) --------------------

@pytest.mark.parametrize(("kinds", "weights", "excl", "field"), [
    ({"dxo1": WEIGHT_DIFF, "dxo2": WEIGHT_DIFF}, None, {"dxo1": 3.0, "dxo2": ""}, "exclude_vars.dxo1"),
    ({"dxo1": WEIGHT_DIFF, "dxo2": "ANALYTIC"}, None, None, "expected_data_kind.dxo2"),
    ({"dxo1": WEIGHT_DIFF, "dxo2": WEIGHT_DIFF}, {"dxo1": {"client_0": 1.0, "client_1": 2.0}}, None,
     "aggregation_weights"),
    ({"dxo1": WEIGHT_DIFF, "dxo2": WEIGHT_DIFF}, None, {"dxo2": ""}, "exclude_vars"),
    ({"dxo1": WEIGHT_DIFF}, None, 2.0, "exclude_vars"),
    ({}, None, None, "expected_data_kind"),
    ({"dxo1": WEIGHTS}, {"dxo1": {"client_0": -1}}, None, "aggregation_weights.dxo1.client_0"),
    ({"dxo1": WEIGHTS}, {"dxo1": {"c": 1}, "dxo9": {"c": 1}}, None, "aggregation_weights"),
    ({"dxo1": WEIGHTS}, None, {"dxo1": "(unclosed"}, "exclude_vars.dxo1"),
])
def test_invalid_collection_arguments_name_the_field(kinds: dict[str, str], weights: Any, excl: Any,
                                                     field: str) -> None:
    with pytest.raises(CollectionConfigError) as e:
        resolve_collection(kinds, weights, excl)
    assert e.value.field == field, str(e.value)


def test_a_value_given_once_is_every_keys() -> None:
    kinds = {"dxo1": WEIGHTS, "dxo2": WEIGHT_DIFF}
    got = resolve_collection(kinds, None, "hello")
    assert got == {"dxo1": KeySettings(WEIGHTS, {}, "hello"), "dxo2": KeySettings(WEIGHT_DIFF, {}, "hello")}
    flat = {"client_0": 1.0, "client_1": 2.0}
    assert resolve_collection(kinds, flat, None) == resolve_collection(kinds, {"dxo1": flat, "dxo2": flat}, {
        "dxo1": "", "dxo2": ""})
    per_key = resolve_collection(kinds, {"dxo1": {"a": 1}, "dxo2": {"a": 3}}, {"dxo1": "x", "dxo2": "y"})
    assert per_key["dxo2"] == KeySettings(WEIGHT_DIFF, {"a": 3.0}, "y")


# --- aggregation per key ------------------------------------------------------------------------

@pytest.mark.parametrize("n_clients", [10, 50, 100])
@pytest.mark.parametrize("shape", [(4,), (6, 6)])
@pytest.mark.parametrize("num_dxo", [1, 2, 3])
def test_random_collections_average_per_key_as_nvflare(num_dxo: int, shape: tuple[int, ...], n_clients: int) -> None:
    """NVFlare's test_aggregate_random_dxos: per-key site weights × the site's NUM_STEPS, per key."""
    rng = np.random.default_rng(1000 * num_dxo + 10 * len(shape) + n_clients)
    names = [f"dxo_{i}" for i in range(num_dxo)]
    clients = [f"client_{i}" for i in range(n_clients)]
    weights = {k: {c: float(rng.random()) for c in clients} for k in names}
    agg = CollectionAggregator(resolve_collection({k: WEIGHT_DIFF for k in names}, weights), targets=clients)
    total = {k: np.zeros(shape) for k in names}
    wsum = dict.fromkeys(names, 0.0)
    for c in clients:
        steps = int(rng.integers(1, 51))
        subs = {}
        for k in names:
            values = rng.random(shape)
            subs[k] = DXO(WEIGHT_DIFF, {"var1": values}, {NUM_STEPS: steps})
            total[k] = total[k] + values * steps * weights[k][c]
            wsum[k] += steps * weights[k][c]
        agg.accept(c, RC_OK, collection(subs))
    out = agg.aggregate()
    assert out is not None and out.kind == COLLECTION and list(out.subs) == names
    for k in names:
        assert out.subs[k].kind == WEIGHT_DIFF
        np.testing.assert_allclose(out.subs[k].data["var1"], total[k] / wsum[k])


def _two_key_aggregator(**kw: Any) -> CollectionAggregator:
    keys = resolve_collection({"model": WEIGHTS, "delta": WEIGHT_DIFF, "scores": METRICS}, **kw)
    return CollectionAggregator(keys, targets=["s1", "s2", "s3"],
                                spec={"a": VarSpec("<f4", (2,)), "b": VarSpec("<f4", (2,))})


def _result(a: list[float], b: list[float], acc: float, steps: int = 1) -> DXO:
    return collection({"model": DXO(WEIGHTS, {"a": np.array(a, np.float32)}, {NUM_STEPS: steps}),
                       "delta": DXO(WEIGHT_DIFF, {"b": np.array(b, np.float32)}, {NUM_STEPS: steps}),
                       "scores": DXO(METRICS, {"accuracy": np.array(acc)}, {NUM_STEPS: steps})})


def test_each_key_has_its_weights_and_exclude_vars() -> None:
    agg = _two_key_aggregator(aggregation_weights={"model": {"s1": 1, "s2": 3}, "delta": {"s1": 1, "s2": 1},
                                                   "scores": {}},
                              exclude_vars={"model": "", "delta": "^b$", "scores": ""})
    agg.accept("s1", RC_OK, _result([1, 2], [10, 10], 0.5))
    agg.accept("s2", RC_OK, _result([5, 6], [20, 20], 0.7, steps=2))
    out = agg.aggregate()
    assert out is not None and out.meta == {"accepted": ["s1", "s2"]}
    # model: weights 1·1 and 3·2 -> (1·[1,2] + 6·[5,6]) / 7
    np.testing.assert_allclose(out.subs["model"].data["a"], [(1 + 30) / 7, (2 + 36) / 7], rtol=1e-6)
    assert out.subs["delta"].data == {}  # its only variable is excluded for that key
    assert float(out.subs["scores"].data["accuracy"]) == pytest.approx((0.5 + 2 * 0.7) / 3)


def test_a_refused_sub_dxo_refuses_the_whole_result_and_adds_nothing() -> None:
    agg = _two_key_aggregator()
    agg.accept("s1", RC_OK, _result([1, 1], [1, 1], 0.5))
    bad = _result([9, 9], [float("nan"), 1], 0.9)
    with pytest.raises(Rejected, match=r"sub-DXO 'delta'.*NaN"):
        agg.accept("s2", RC_OK, bad)
    wrong_shape = _result([9, 9, 9], [1, 1], 0.9)
    with pytest.raises(Rejected, match=r"sub-DXO 'model'.*shape"):
        agg.accept("s2", RC_OK, wrong_shape)
    out = agg.aggregate()
    assert out is not None and out.meta["accepted"] == ["s1"]
    assert out.subs["model"].data["a"].tolist() == [1, 1]  # nothing of s2's "model" was added before the refusal


def test_missing_keys_are_skipped_and_a_result_without_any_is_refused() -> None:
    agg = _two_key_aggregator()
    agg.accept("s1", RC_OK, collection({"model": DXO(WEIGHTS, {"a": np.array([2, 4], np.float32)}),
                                        "other": DXO(WEIGHTS, {"z": np.zeros(1)})}))  # "other" is ignored
    agg.accept("s2", RC_OK, _result([4, 8], [1, 1], 0.5))
    with pytest.raises(Rejected, match="none of the expected keys"):
        agg.accept("s3", RC_OK, collection({"other": DXO(WEIGHTS, {"z": np.zeros(1)})}))
    out = agg.aggregate()
    assert out is not None
    assert out.subs["model"].data["a"].tolist() == [3, 6] and out.subs["model"].meta["accepted"] == ["s1", "s2"]
    assert out.subs["delta"].meta["accepted"] == ["s2"]
    assert any("lacks key(s) ['delta', 'scores']" in n for n in agg.notes)


@pytest.mark.parametrize(("site", "rc", "dxo", "match"), [
    ("s1", RC_OK, DXO(WEIGHTS, {"a": np.zeros(2, np.float32)}), "expected a COLLECTION"),
    ("s1", RC_OK, None, "sent no DXO"),
    ("s1", "EXECUTION_EXCEPTION", None, "returned rc"),
    ("s9", RC_OK, collection({}), "not a target"),
    ("s1", RC_OK, collection({"model": DXO(WEIGHT_DIFF, {"a": np.zeros(2, np.float32)})}),
     "sub-DXO 'model': expected data kind WEIGHTS but got WEIGHT_DIFF"),
])
def test_refusals(site: str, rc: str, dxo: DXO | None, match: str) -> None:
    with pytest.raises(Rejected, match=match):
        _two_key_aggregator().accept(site, rc, dxo)


def test_a_second_result_from_a_site_is_a_duplicate() -> None:
    agg = _two_key_aggregator()
    agg.accept("s1", RC_OK, _result([1, 1], [1, 1], 0.5))
    with pytest.raises(Rejected, match="duplicate"):
        agg.accept("s1", RC_OK, _result([1, 1], [1, 1], 0.5))


def test_a_single_kind_round_refuses_a_collection() -> None:
    agg = InTimeAccumulateWeightedAggregator(WEIGHTS, targets=["s1"])
    with pytest.raises(Rejected, match="got a COLLECTION"):
        agg.accept("s1", RC_OK, _result([1, 1], [1, 1], 0.5))


def test_nothing_accepted_aggregates_to_none_and_a_silent_key_to_an_empty_dxo() -> None:
    assert _two_key_aggregator().aggregate() is None
    agg = _two_key_aggregator()
    agg.accept("s1", RC_OK, collection({"model": DXO(WEIGHTS, {"a": np.array([2, 4], np.float32)})}))
    out = agg.aggregate()
    assert out is not None and out.subs["delta"] == DXO(WEIGHT_DIFF, {}, {"accepted": []})


def test_a_collection_in_parts_is_refused_with_the_reason() -> None:
    """Over SAGMQ_CHUNK_BYTES a result travels as a blob; the aggregator does not stream collections."""
    r = TaskResult("j", 0, "train", "t", "s1", RC_OK, _result([1, 1], [1, 1], 0.5))
    parts = list(split(r.to_wire(), 8))
    header = unpack(parts[0].body, 2**20)
    head = read_stream_header(header["dxo"], len(parts), parts[0].headers["x-sagmq-size"])
    assert head.kind == COLLECTION
    with pytest.raises(Rejected, match=r"does not stream collections.*SAGMQ_CHUNK_BYTES"):
        _two_key_aggregator().begin_stream("blob", "s1", RC_OK, head)
    with pytest.raises(Rejected, match="got a COLLECTION"):
        InTimeAccumulateWeightedAggregator(WEIGHTS, targets=["s1"]).begin_stream("blob", "s1", RC_OK, head)
    with pytest.raises(Rejected, match="expected a COLLECTION"):
        _two_key_aggregator().begin_stream("b", "s1", RC_OK, StreamHeader(WEIGHTS, {}, {}, 2, 8))


# --- the server applies a COLLECTION aggregate -----------------------------------------------------

def _model() -> dict[str, np.ndarray]:
    return {"a": np.array([1.0, 2.0], np.float32), "b": np.array([10.0, 20.0], np.float32),
            "c": np.array([5.0], np.float32)}


def test_weights_replace_diffs_add_and_metrics_are_not_applied() -> None:
    agg = collection({"model": DXO(WEIGHTS, {"a": np.array([7.0, 8.0], np.float32)}),
                      "delta": DXO(WEIGHT_DIFF, {"b": np.array([1.0, -1.0], np.float32)}),
                      "scores": DXO(METRICS, {"accuracy": np.array(0.9)})})
    before = _model()
    out = FullModelShareableGenerator().shareable_to_learnable(agg, before)
    assert out["a"].tolist() == [7, 8] and out["b"].tolist() == [11, 19] and out["c"].tolist() == [5]
    assert set(out) == {"a", "b", "c"} and before["b"].tolist() == [10, 20]  # the input is not changed
    assert collection_metrics(agg) == {"scores": {"accuracy": 0.9}}
    assert collection_metrics(DXO(WEIGHTS, {"a": np.zeros(1)})) == {}


def test_empty_sub_dxos_leave_the_model_as_it_is() -> None:
    agg = collection({"model": DXO(WEIGHTS, {}), "delta": DXO(WEIGHT_DIFF, {})})
    model = _model()
    assert apply_aggregate(model, agg) is model


@pytest.mark.parametrize(("subs", "match"), [
    ({"k1": DXO(WEIGHTS, {"a": np.zeros(2)}), "k2": DXO(WEIGHT_DIFF, {"a": np.zeros(2)})},
     "variable 'a' in both sub-DXO 'k1' and 'k2'"),
    ({"k1": DXO(WEIGHT_DIFF, {"zz": np.zeros(2)})}, "lacks"),
    ({"k1": DXO("ANALYTIC", {"a": np.zeros(2)})}, "sub-DXO 'k1' of kind ANALYTIC"),
])
def test_merge_refusals_give_the_reason(subs: dict[str, DXO], match: str) -> None:
    with pytest.raises(SagmqError, match=match):
        apply_aggregate(_model(), collection(subs))


# --- the job spec ----------------------------------------------------------------------------------

def _files(**agg_args: Any) -> dict[str, bytes]:
    files = read_job_folder(ROOT / "jobs" / "hello-numpy-sag")
    cfg = json.loads(files[SFILE])
    cfg["components"][2]["args"] = agg_args
    files[SFILE] = json.dumps(cfg).encode()
    return files


def test_a_dict_expected_data_kind_is_accepted_with_per_key_settings() -> None:
    spec = parse_job(_files(expected_data_kind={"model": WEIGHTS, "scores": METRICS},
                            aggregation_weights={"site-1": 1.0, "site-2": 2.0}, exclude_vars="^tmp",
                            weigh_by_local_iter=False))
    agg = spec.aggregator
    assert agg.expected_data_kind == COLLECTION and agg.weigh_by_local_iter is False
    assert agg.collection == {"model": KeySettings(WEIGHTS, {"site-1": 1.0, "site-2": 2.0}, "^tmp"),
                              "scores": KeySettings(METRICS, {"site-1": 1.0, "site-2": 2.0}, "^tmp")}
    nested = parse_job(_files(expected_data_kind={"a": WEIGHTS, "b": WEIGHT_DIFF},
                              aggregation_weights={"a": {"site-1": 3}, "b": {}}, exclude_vars={"a": "x", "b": ""}))
    assert nested.aggregator.collection["a"] == KeySettings(WEIGHTS, {"site-1": 3.0}, "x")
    assert nested.aggregator.collection["b"] == KeySettings(WEIGHT_DIFF, {}, "")


@pytest.mark.parametrize(("args", "field"), [
    ({"expected_data_kind": {"a": "WEIGHTS", "b": "NOPE"}}, "expected_data_kind.b"),
    ({"expected_data_kind": {}}, "expected_data_kind"),
    ({"expected_data_kind": {"a": "WEIGHTS", "b": "WEIGHTS"}, "exclude_vars": {"a": ""}}, "exclude_vars"),
    ({"expected_data_kind": {"a": "WEIGHTS"}, "exclude_vars": {"a": 3}}, "exclude_vars.a"),
    ({"expected_data_kind": {"a": "WEIGHTS"}, "exclude_vars": ["x"]}, "exclude_vars"),
    ({"expected_data_kind": {"a": "WEIGHTS", "b": "WEIGHTS"}, "aggregation_weights": {"a": {"site-1": 1}}},
     "aggregation_weights"),
    ({"expected_data_kind": {"a": "WEIGHTS"}, "aggregation_weights": {"a": {"site-1": "1"}}},
     "aggregation_weights.a.site-1"),
    ({"expected_data_kind": {"a": "WEIGHTS"}, "aggregation_weights": {"site-1": float("nan")}},
     "aggregation_weights.site-1"),
    ({"expected_data_kind": {"a": "WEIGHTS"}, "weigh_by_local_iter": {"a": True}}, "weigh_by_local_iter"),
    ({"expected_data_kind": {"a": "WEIGHTS"}, "collection": {}}, "collection"),
])
def test_collection_refusals_name_file_and_field(args: dict[str, Any], field: str) -> None:
    with pytest.raises(JobSpecError) as e:
        parse_job(_files(**args))
    assert (e.value.file, e.value.field) == (SFILE, f"{AGG}.{field}"), str(e.value)


# --- filters see each sub-DXO, as NVFlare's DXOFilter -----------------------------------------------

def test_a_dxo_filter_filters_each_sub_dxo_of_a_collection() -> None:
    coll = collection({"model": DXO(WEIGHTS, {"a": np.zeros(2), "secret": np.ones(2)}),
                       "scores": DXO(METRICS, {"secret": np.array(1.0)})}, {"m": 1})
    ctx = FilterContext("site-1", "j", 0, "train", "task_result")
    out = ExcludeVars(exclude_vars="secret").process(coll, ctx)
    assert out.kind == COLLECTION and out.meta == {"m": 1}
    assert set(out.subs["model"].data) == {"a"}
    assert set(out.subs["scores"].data) == {"secret"}  # METRICS is not among ExcludeVars' data kinds



# --- the server's round core: the round.open it sends, the metrics it records ---------------------------

def test_the_round_core_opens_collection_rounds_and_records_metrics() -> None:
    spec = parse_job(_files(expected_data_kind={"model": WEIGHT_DIFF, "scores": METRICS},
                            aggregation_weights={"model": {"site-1": 2.0}, "scores": {}}, exclude_vars="^tmp"))
    sag = ScatterAndGather("job-1", spec, heartbeat_s=2.0, schedule_timeout_s=60.0, forward_min_bytes=1 << 20)
    sites = {"site-1", "site-2"}
    sag.start(0.0, sites)
    model = {"numpy_key": np.ones((3, 3), np.float32)}
    effects = sag.on_loaded(ModelLoaded("job-1", "initial", DXO(WEIGHTS, model)), 0.0)
    (opening,) = [e.message for e in effects if isinstance(e, OpenRound)]
    assert opening.expected_data_kind == COLLECTION and not opening.persist and not opening.forward
    assert opening.collection_kinds == {"model": WEIGHT_DIFF, "scores": METRICS}
    assert opening.collection_weights == {"model": {"site-1": 2.0}, "scores": {}}
    assert opening.collection_exclude_vars == {"model": "^tmp", "scores": "^tmp"}
    agg = collection({"model": DXO(WEIGHT_DIFF, {"numpy_key": np.full((3, 3), 2, np.float32)}),
                      "scores": DXO(METRICS, {"accuracy": np.array(0.25), "loss": np.array([1.0, 2.0])})})
    sag.on_aggregated(RoundAggregated("job-1", 0, ["site-1", "site-2"], agg, opening.task_id), 1.0)
    assert sag.weights["numpy_key"].tolist() == [[3.0] * 3] * 3
    (rec,) = sag.history
    assert rec.to_dict()["collection_metrics"] == {"scores": {"accuracy": 0.25, "loss": [1.0, 2.0]}}
