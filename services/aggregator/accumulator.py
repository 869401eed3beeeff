"""InTimeAccumulateWeightedAggregator as pure numpy: validate, then accumulate in place.

Weight of a contribution = aggregation_weights.get(site, 1.0) × meta
NUM_STEPS_CURRENT_ROUND (default 1). Per variable k the result is
Σ w_i·x_i[k] / Σ w_i over the contributions that carry k. One accumulator per round:
memory is one model (plus the result being added), whatever the number of sites.
A contribution is checked completely before any of it is added, so a rejected one
never leaves part of itself behind.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sagmq.job.spec import AggregatorConfig
from sagmq.wire.codec import DATA_KINDS, DXO
from sagmq.wire.errors import Rejected
from sagmq.wire.messages import RC_OK

NUM_STEPS = "NUM_STEPS_CURRENT_ROUND"


@dataclass(frozen=True, slots=True)
class VarSpec:
    """dtype and shape a variable must have (those of the global model)."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(slots=True)
class Accumulator:
    """The running weighted sum of one round."""

    config: AggregatorConfig
    targets: frozenset[str]
    spec: Mapping[str, VarSpec] = field(default_factory=dict)
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    accepted: list[str] = field(default_factory=list)
    _exclude: re.Pattern[str] | None = None

    def __post_init__(self) -> None:
        self._exclude = re.compile(self.config.exclude_vars) if self.config.exclude_vars else None

    def check_header(
        self, site: str, rc: str, kind: str | None, meta: Mapping[str, Any],
        variables: Mapping[str, tuple[str, tuple[int, ...]]], error: str = "",
    ) -> tuple[float, list[str]]:
        """Check everything but the values; return the weight and the variables to add, or raise Rejected."""
        if rc != RC_OK:
            raise Rejected(f"site {site} returned rc {rc}: {error or 'no reason given'}")
        if site not in self.targets:
            raise Rejected(f"site {site} is not a target of this round")
        if kind is None:
            raise Rejected(f"site {site} sent no DXO")
        if kind not in DATA_KINDS:
            raise Rejected(f"cannot handle data kind {kind!r}")
        if kind != self.config.expected_data_kind:
            raise Rejected(f"expected data kind {self.config.expected_data_kind} but got {kind}")
        if site in self.accepted:
            raise Rejected(f"duplicate: a contribution from site {site} was already accepted this round")
        steps = meta.get(NUM_STEPS, 1)
        if isinstance(steps, bool) or not isinstance(steps, int | float) or not math.isfinite(steps) or steps < 0:
            raise Rejected(f"meta {NUM_STEPS}={steps!r} is not a non-negative number")
        weight = float(self.config.aggregation_weights.get(site, 1.0)) * float(steps)
        names: list[str] = []
        for name, (dtype, shape) in variables.items():
            if self._exclude is not None and self._exclude.search(name):
                continue
            want = self.spec.get(name)
            if self.spec and want is None:
                raise Rejected(f"variable {name!r} is not in the global model")
            if want is not None and tuple(shape) != want.shape:
                raise Rejected(f"variable {name!r} has shape {tuple(shape)}, the model has {want.shape}")
            if np.dtype(dtype).kind not in "fiu":
                raise Rejected(f"variable {name!r} has non-numeric dtype {dtype}")
            names.append(name)
        if not names:
            raise Rejected(f"site {site} sent no variable to aggregate")
        return weight, names

    @staticmethod
    def check_values(name: str, values: np.ndarray) -> None:
        """Refuse NaN and Inf."""
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise Rejected(f"variable {name!r} holds NaN or Inf")

    def _sum(self, name: str, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        acc = self.sums.get(name)
        if acc is None:
            want = self.spec.get(name)
            dt = np.dtype(want.dtype) if want is not None else dtype
            acc = np.zeros(shape, dtype=dt if dt.kind == "f" else np.float64)
            self.sums[name] = acc
            self.weights[name] = 0.0
        return acc

    def add_values(self, name: str, start: int, values: np.ndarray, weight: float, shape: tuple[int, ...]) -> None:
        """Add a flat run of a variable's values (starting at element start) to its sum, in place."""
        acc = self._sum(name, values.dtype, shape).reshape(-1)
        target = acc[start:start + values.size]
        if self.config.weigh_by_local_iter:
            target += values * acc.dtype.type(weight)
        else:
            target += values

    def finish(self, site: str, names: list[str], weight: float) -> None:
        """Count a contribution whose values were all added."""
        for name in names:
            self.weights[name] = self.weights.get(name, 0.0) + weight
        self.accepted.append(site)

    def check(self, site: str, rc: str, dxo: DXO | None, error: str = "") -> tuple[dict[str, np.ndarray], float]:
        """Validate a whole contribution; return the arrays to add and its weight, or raise Rejected."""
        variables = {k: (v.dtype.str, tuple(v.shape)) for k, v in dxo.data.items()} if dxo else {}
        weight, names = self.check_header(site, rc, dxo.kind if dxo else None, dxo.meta if dxo else {},
                                          variables, error)
        assert dxo is not None
        for name in names:
            self.check_values(name, dxo.data[name])
        return {n: dxo.data[n] for n in names}, weight

    def add(self, site: str, arrays: Mapping[str, np.ndarray], weight: float) -> None:
        """Add a checked contribution to the sums in place."""
        for name, arr in arrays.items():
            self.add_values(name, 0, arr.reshape(-1), weight, tuple(arr.shape))
        self.finish(site, list(arrays), weight)

    def accept(self, site: str, rc: str, dxo: DXO | None, error: str = "") -> None:
        """Check and add, or raise Rejected with the reason."""
        arrays, weight = self.check(site, rc, dxo, error)
        self.add(site, arrays, weight)

    def result(self) -> DXO | None:
        """The weighted average (None if nothing was accepted); variables with zero weight are left out."""
        if not self.accepted:
            return None
        out: dict[str, np.ndarray] = {}
        for name, acc in self.sums.items():
            w = self.weights.get(name, 0.0)
            if w > 0:
                acc /= acc.dtype.type(w)  # in place: the sums are not needed any more
                want = self.spec.get(name)
                out[name] = acc.astype(want.dtype, copy=False) if want is not None else acc
        meta: dict[str, Any] = {"accepted": list(self.accepted)}
        return DXO(self.config.expected_data_kind, out, meta)
