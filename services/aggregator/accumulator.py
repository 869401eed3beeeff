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

from services.wire.codec import DATA_KINDS, DXO
from services.wire.errors import Rejected
from services.wire.jobspec import AggregatorConfig
from services.wire.messages import RC_OK

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

    def check(self, site: str, rc: str, dxo: DXO | None, error: str = "") -> tuple[dict[str, np.ndarray], float]:
        """Validate a contribution; return the arrays to add and its weight, or raise Rejected."""
        if rc != RC_OK:
            raise Rejected(f"site {site} returned rc {rc}: {error or 'no reason given'}")
        if site not in self.targets:
            raise Rejected(f"site {site} is not a target of this round")
        if dxo is None:
            raise Rejected(f"site {site} sent no DXO")
        if dxo.kind not in DATA_KINDS:
            raise Rejected(f"cannot handle data kind {dxo.kind!r}")
        if dxo.kind != self.config.expected_data_kind:
            raise Rejected(f"expected data kind {self.config.expected_data_kind} but got {dxo.kind}")
        if site in self.accepted:
            raise Rejected(f"duplicate: a contribution from site {site} was already accepted this round")
        steps = dxo.meta.get(NUM_STEPS, 1)
        if isinstance(steps, bool) or not isinstance(steps, int | float) or not math.isfinite(steps) or steps < 0:
            raise Rejected(f"meta {NUM_STEPS}={steps!r} is not a non-negative number")
        weight = float(self.config.aggregation_weights.get(site, 1.0)) * float(steps)
        arrays: dict[str, np.ndarray] = {}
        for name, arr in dxo.data.items():
            if self._exclude is not None and self._exclude.search(name):
                continue
            want = self.spec.get(name)
            if self.spec and want is None:
                raise Rejected(f"variable {name!r} is not in the global model")
            if want is not None and tuple(arr.shape) != want.shape:
                raise Rejected(f"variable {name!r} has shape {tuple(arr.shape)}, the model has {want.shape}")
            if arr.dtype.kind not in "fiu":
                raise Rejected(f"variable {name!r} has non-numeric dtype {arr.dtype.str}")
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise Rejected(f"variable {name!r} holds NaN or Inf")
            arrays[name] = arr
        if not arrays:
            raise Rejected(f"site {site} sent no variable to aggregate")
        return arrays, weight

    def add(self, site: str, arrays: Mapping[str, np.ndarray], weight: float) -> None:
        """Add a checked contribution to the sums in place."""
        for name, arr in arrays.items():
            acc = self.sums.get(name)
            if acc is None:
                dtype = self.spec[name].dtype if name in self.spec else arr.dtype.str
                acc = np.zeros(arr.shape, dtype=np.dtype(dtype) if np.dtype(dtype).kind == "f" else np.float64)
                self.sums[name] = acc
                self.weights[name] = 0.0
            if self.config.weigh_by_local_iter:
                acc += arr * acc.dtype.type(weight)
            else:
                acc += arr
            self.weights[name] += weight
        self.accepted.append(site)

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
            w = self.weights[name]
            if w > 0:
                avg = acc / acc.dtype.type(w)
                want = self.spec.get(name)
                out[name] = avg.astype(want.dtype, copy=False) if want is not None else avg
        meta: dict[str, Any] = {"accepted": list(self.accepted)}
        return DXO(self.config.expected_data_kind, out, meta)
