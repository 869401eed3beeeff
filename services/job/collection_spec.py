"""NVFlare's collection mode of InTimeAccumulateWeightedAggregator: its arguments, checked and resolved per key.

When ``expected_data_kind`` is a dict ``{key: WEIGHTS | WEIGHT_DIFF | METRICS}``, each key is
aggregated with its own ``aggregation_weights`` and ``exclude_vars``: a value given once is
every key's, a dict of them must name every key (NVFlare's rules). The job spec checks a job
with these at submit; the aggregator (sagmq.aggregator.collection) runs on the result.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sagmq.wire.codec import METRICS, WEIGHT_DIFF, WEIGHTS

KINDS_IN_COLLECTION = (WEIGHTS, WEIGHT_DIFF, METRICS)


class CollectionConfigError(ValueError):
    """An invalid collection-mode argument: ``field`` is the argument's path (say exclude_vars.dxo1)."""

    def __init__(self, fld: str, problem: str) -> None:
        super().__init__(f"{fld}: {problem}")
        self.field = fld
        self.problem = problem


@dataclass(frozen=True, slots=True)
class KeySettings:
    """What one key of the collection is aggregated with."""

    kind: str
    aggregation_weights: dict[str, float]
    exclude_vars: str


def resolve_collection(expected_data_kind: Any, aggregation_weights: Any = None,
                       exclude_vars: Any = None) -> dict[str, KeySettings]:
    """The settings of each key, by NVFlare's rules (a value given once is every key's); CollectionConfigError
    names the argument that breaks them."""
    kinds = _kinds(expected_data_kind)
    excl = _exclude_vars(kinds, exclude_vars)
    weights = _weights(kinds, aggregation_weights)
    return {k: KeySettings(kinds[k], weights[k], excl[k]) for k in kinds}


def _kinds(expected: Any) -> dict[str, str]:
    if not isinstance(expected, Mapping) or not expected:
        raise CollectionConfigError("expected_data_kind", "collection mode needs a non-empty dict "
                                    "{key: WEIGHTS | WEIGHT_DIFF | METRICS}")
    for k, v in expected.items():
        if v not in KINDS_IN_COLLECTION:
            raise CollectionConfigError(f"expected_data_kind.{k}", f"is {v!r}, not WEIGHTS, WEIGHT_DIFF or METRICS")
    return {str(k): str(v) for k, v in expected.items()}


def _exclude_vars(kinds: Mapping[str, str], excl: Any) -> dict[str, str]:
    """One regular expression for every key, or a dict naming every key (NVFlare: a missing key is an error)."""
    if isinstance(excl, Mapping):
        missing = [k for k in kinds if k not in excl]
        if missing:
            raise CollectionConfigError("exclude_vars", f"a dict exclude_vars must name every key of "
                                        f"expected_data_kind; it lacks {missing}")
        _no_stray("exclude_vars", kinds, excl)
        out = {}
        for k in kinds:
            out[k] = _regex(f"exclude_vars.{k}", excl[k])
        return out
    if excl and not isinstance(excl, str):
        raise CollectionConfigError("exclude_vars", f"must be a regular expression string or a dict of them per key, "
                                    f"got {type(excl).__name__} {excl!r}")
    one = _regex("exclude_vars", excl or "")
    return {k: one for k in kinds}


def _regex(fld: str, v: Any) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise CollectionConfigError(fld, f"must be a regular expression string, got {type(v).__name__} {v!r}")
    try:
        re.compile(v)
    except re.error as e:
        raise CollectionConfigError(fld, f"invalid regular expression: {e}") from e
    return v


def _weights(kinds: Mapping[str, str], weights: Any) -> dict[str, dict[str, float]]:
    """{site: weight} for every key, or {key: {site: weight}} naming every key. As NVFlare, the dict is
    per key when its first value is a dict."""
    if weights is None or (isinstance(weights, Mapping) and not weights):
        return {k: {} for k in kinds}
    if not isinstance(weights, Mapping):
        raise CollectionConfigError("aggregation_weights", "must map site names to numbers, or keys of "
                                    "expected_data_kind to such maps")
    if not isinstance(next(iter(weights.values())), Mapping):
        one = _site_weights("aggregation_weights", weights)
        return {k: dict(one) for k in kinds}
    missing = [k for k in kinds if k not in weights]
    if missing:
        raise CollectionConfigError("aggregation_weights", f"a dict of dicts aggregation_weights must name every "
                                    f"key of expected_data_kind; it lacks {missing}")
    _no_stray("aggregation_weights", kinds, weights)
    return {k: _site_weights(f"aggregation_weights.{k}", weights[k]) for k in kinds}


def _site_weights(fld: str, weights: Any) -> dict[str, float]:
    if not isinstance(weights, Mapping):
        raise CollectionConfigError(fld, f"must map site names to numbers, got {type(weights).__name__}")
    out = {}
    for site, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise CollectionConfigError(f"{fld}.{site}", f"must be a number >= 0, got {w!r}")
        out[str(site)] = float(w)
    return out


def _no_stray(fld: str, kinds: Mapping[str, str], given: Mapping[str, Any]) -> None:
    """A per-key dict naming a key expected_data_kind lacks is refused (NVFlare ignores it: likely a typo)."""
    stray = [k for k in given if k not in kinds]
    if stray:
        raise CollectionConfigError(fld, f"names key(s) {stray} that expected_data_kind lacks "
                                    f"(it has {list(kinds)})")
