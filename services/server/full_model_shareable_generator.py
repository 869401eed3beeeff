"""FullModelShareableGenerator: the global model as a round's task data, and an aggregate back into it.

NVFlare's component of that name converts between the "learnable" (the global model the
server keeps) and the "shareable" (what travels to the sites and back). In sagmq the model
is a dict of named ndarrays and the shareable is a DXO. Beyond NVFlare, a COLLECTION aggregate
(expected_data_kind as a dict) is applied by merging its sub-DXOs (see _merged).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from sagmq.wire.codec import COLLECTION, DXO, METRICS, WEIGHT_DIFF, WEIGHTS
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
    NVFlare does. A WEIGHT_DIFF is added as NVFlare adds it (global + diff, the result in numpy's
    promoted dtype, never cast back). Unlike NVFlare, variables that the aggregate does not carry (exclude_vars)
    keep their global value instead of disappearing from the model. The input dict is never
    changed; a new dict is returned.
    """
    if dxo is not None and dxo.kind == COLLECTION:
        return _merged(global_weights, dxo)
    if dxo is None or not dxo.data:
        return global_weights
    if dxo.kind == WEIGHTS:
        return _replaced(global_weights, dxo.data)
    if dxo.kind == WEIGHT_DIFF:
        return _added(global_weights, dxo.data)
    raise SagmqError(f"FullModelShareableGenerator cannot apply a {dxo.kind} aggregate")


def _merged(global_weights: Weights, dxo: DXO) -> Weights:
    """A COLLECTION aggregate (NVFlare's collection mode), which NVFlare's generator cannot apply: each WEIGHTS
    or WEIGHT_DIFF sub-DXO is applied in turn as above; METRICS sub-DXOs are not model variables and are left
    out (collection_metrics gives them for the round's history). A variable carried by two sub-DXOs is refused:
    which one should win is not the generator's to guess."""
    owner: dict[str, str] = {}
    for key, sub in dxo.subs.items():
        if sub.kind == METRICS:
            continue
        if sub.kind not in (WEIGHTS, WEIGHT_DIFF):
            raise SagmqError(f"FullModelShareableGenerator cannot apply sub-DXO {key!r} of kind {sub.kind}")
        for name in sub.data:
            if name in owner:
                raise SagmqError(f"the COLLECTION aggregate carries variable {name!r} in both sub-DXO "
                                 f"{owner[name]!r} and {key!r}: refused, a variable is applied from one key only")
            owner[name] = key
    out = global_weights
    for sub in dxo.subs.values():
        if sub.kind in (WEIGHTS, WEIGHT_DIFF) and sub.data:
            out = _replaced(out, sub.data) if sub.kind == WEIGHTS else _added(out, sub.data)
    return out


def collection_metrics(dxo: DXO | None) -> dict[str, dict[str, Any]]:
    """The METRICS sub-DXOs of a COLLECTION aggregate as plain values, {key: {name: number or list}}
    (for the round's history); empty for any other aggregate."""
    if dxo is None or dxo.kind != COLLECTION:
        return {}
    return {key: {name: np.asarray(v).tolist() for name, v in sub.data.items()}
            for key, sub in dxo.subs.items() if sub.kind == METRICS}


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
        # NVFlare's weights[k] + v, no cast back: an int model plus a float diff becomes float, a float32
        # model plus a float64 diff float64
        out[k] = global_weights[k] + v
    return out
