"""FullModelShareableGenerator: the global model as a round's task data, and an aggregate back into it.

NVFlare's component of that name converts between the "learnable" (the global model the
server keeps) and the "shareable" (what travels to the sites and back). In sagmq the model
is a dict of named ndarrays and the shareable is a DXO.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from sagmq.wire.codec import DXO, WEIGHT_DIFF, WEIGHTS
from sagmq.wire.errors import SagmqError

Weights = dict[str, np.ndarray]


class FullModelShareableGenerator:
    """Sends the whole global model each round and applies whole aggregates to it."""

    def learnable_to_shareable(self, weights: Weights, meta: dict[str, Any] | None = None) -> DXO:
        """The global model as the task's DXO of kind WEIGHTS (the arrays are shared, not copied)."""
        return DXO(WEIGHTS, weights, dict(meta or {}))

    def shareable_to_learnable(self, dxo: DXO | None, weights: Weights) -> Weights:
        """The next global model: the aggregate applied to the current one (see apply_aggregate)."""
        return apply_aggregate(weights, dxo)


def apply_aggregate(global_weights: Weights, dxo: DXO | None) -> Weights:
    """WEIGHTS replace the variables they carry; WEIGHT_DIFF is added to the global model.

    An empty or missing aggregate (no accepted contribution) leaves the model as it is, as
    NVFlare does. Unlike NVFlare, variables that the aggregate does not carry (exclude_vars)
    keep their global value instead of disappearing from the model. The input dict is never
    changed; a new dict is returned.
    """
    if dxo is None or not dxo.data:
        return global_weights
    if dxo.kind == WEIGHTS:
        return _replaced(global_weights, dxo.data)
    if dxo.kind == WEIGHT_DIFF:
        return _added(global_weights, dxo.data)
    raise SagmqError(f"FullModelShareableGenerator cannot apply a {dxo.kind} aggregate")


def _replaced(global_weights: Weights, new: Mapping[str, np.ndarray]) -> Weights:
    out = dict(global_weights)
    for k, v in new.items():
        # an assembled message owns its (writable) buffer: keep it; a read-only view of a body is copied,
        # so the model never pins a message and can be changed in place
        out[k] = v if v.flags.writeable else np.array(v)
    return out


def _added(global_weights: Weights, diff: Mapping[str, np.ndarray]) -> Weights:
    out = dict(global_weights)
    for k, v in diff.items():
        if k not in global_weights:
            raise SagmqError(f"WEIGHT_DIFF carries variable {k!r}, which the global model lacks")
        base = global_weights[k]
        # a float64 diff does not promote a float32 model
        out[k] = (base + v).astype(base.dtype, copy=False)
    return out
