"""NPValidator (NVFlare's dummy accuracy from the weights, as a METRICS DXO) and NPTrainer's submit_model task,
and the formatter / JSON generator that read the METRICS results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sagmq.client.api import TaskContext, TaskError
from sagmq.client.np_trainer import NPTrainer
from sagmq.client.np_validator import NPValidator, dummy_accuracy
from sagmq.server.np_formatter import NPFormatter, ValidationJsonGenerator
from sagmq.wire.codec import DXO, METRICS, WEIGHTS
from sagmq.wire.messages import RC_BAD_TASK_DATA, RC_EXECUTION_RESULT_ERROR, RC_TASK_ABORTED, RC_TASK_UNKNOWN

MODEL = np.array([[4, 5, 6], [7, 8, 9], [10, 11, 12]], np.float32)


def ctx(tmp_path: Path, task: str = "validate") -> TaskContext:
    return TaskContext("site-1", "j", 3, 3, task, tmp_path)


def test_accuracy_is_nvflares_sum_over_max_plus_a_random_epsilon(tmp_path: Path) -> None:
    # NVFlare: np.sum(data / np.max(data)) + np.random.random(); for the final hello model 72/12 = 6
    assert dummy_accuracy(MODEL, 0.0) == pytest.approx(6.0)
    assert dummy_accuracy(MODEL, 0.25) == pytest.approx(6.25)
    v = NPValidator()
    seen = set()
    for _ in range(20):
        out = v.execute("validate", DXO(WEIGHTS, {"numpy_key": MODEL}, {"model_owner": "site-2"}), ctx(tmp_path))
        assert out.kind == METRICS and set(out.data) == {"accuracy"}
        acc = out.data["accuracy"]
        assert acc.shape == () and acc.dtype == np.float64
        assert 6.0 <= float(acc) < 7.0
        seen.add(float(acc))
    assert len(seen) > 1  # the epsilon is random, as NVFlare's


@pytest.mark.parametrize(("task", "dxo", "rc"), [
    ("train", DXO(WEIGHTS, {"numpy_key": MODEL}), RC_TASK_UNKNOWN),
    ("validate", DXO(METRICS, {"numpy_key": MODEL}), RC_BAD_TASK_DATA),
    ("validate", DXO(WEIGHTS, {}), RC_BAD_TASK_DATA),
    ("validate", DXO(WEIGHTS, {"other": MODEL}), RC_BAD_TASK_DATA),
])
def test_what_nvflares_validator_refuses(tmp_path: Path, task: str, dxo: DXO, rc: str) -> None:
    with pytest.raises(TaskError) as e:
        NPValidator().execute(task, dxo, ctx(tmp_path, task))
    assert e.value.rc == rc


def test_an_aborted_validation_says_so(tmp_path: Path) -> None:
    c = ctx(tmp_path)
    c.abort.set()
    with pytest.raises(TaskError) as e:
        NPValidator(sleep_time=5).execute("validate", DXO(WEIGHTS, {"numpy_key": MODEL}), c)
    assert e.value.rc == RC_TASK_ABORTED


def test_a_renamed_validate_task_and_quick() -> None:
    v = NPValidator(validate_task_name="check")
    assert v.quick("check", DXO(WEIGHTS, {"numpy_key": MODEL})) and not v.quick("validate", DXO(WEIGHTS, {}))
    assert not NPValidator(sleep_time=1).quick("validate", DXO(WEIGHTS, {"numpy_key": MODEL}))


def test_submit_model_returns_the_local_model_of_the_last_training(tmp_path: Path) -> None:
    t = NPTrainer()
    with pytest.raises(TaskError) as e:  # nothing trained yet: NVFlare's EXECUTION_RESULT_ERROR
        t.execute("submit_model", DXO(WEIGHTS, {}), ctx(tmp_path, "submit_model"))
    assert e.value.rc == RC_EXECUTION_RESULT_ERROR
    trained = t.execute("train", DXO(WEIGHTS, {"numpy_key": MODEL - 1}), ctx(tmp_path, "train"))
    out = t.execute("submit_model", DXO(WEIGHTS, {}), ctx(tmp_path, "submit_model"))
    assert out.kind == WEIGHTS and set(out.data) == {"numpy_key"}
    np.testing.assert_array_equal(out.data["numpy_key"], trained.data["numpy_key"])
    np.testing.assert_array_equal(out.data["numpy_key"], MODEL)


def test_json_generator_and_formatter_read_metrics_only() -> None:
    matrix = {"site-1": {"SRV_server": DXO(METRICS, {"accuracy": np.array(6.5)}),
                         "site-2": DXO(WEIGHTS, {"numpy_key": MODEL})},
              "site-2": {"site-1": DXO(METRICS, {"accuracy": np.array([1.0, 2.0])})}}
    assert ValidationJsonGenerator().generate(matrix) == {"site-1": {"SRV_server": {"accuracy": 6.5}},
                                                          "site-2": {"site-1": {"accuracy": [1.0, 2.0]}}}
    text = NPFormatter().format(matrix)
    assert text.splitlines() == ["site-1: SRV_server accuracy=6.5", "site-2: site-1 accuracy=[1.0, 2.0]"]
