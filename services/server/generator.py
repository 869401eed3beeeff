"""FullModelShareableGenerator: turn a round's aggregate into the next global model."""

from __future__ import annotations

import numpy as np

from sagmq.wire.codec import DXO, WEIGHT_DIFF, WEIGHTS
from sagmq.wire.errors import SagmqError


def apply_aggregate(global_weights: dict[str, np.ndarray], dxo: DXO | None) -> dict[str, np.ndarray]:
    """WEIGHTS replace the variables they carry; WEIGHT_DIFF is added to the global model.

    Unlike NVFlare, variables that the aggregate does not carry (exclude_vars) keep
    their global value instead of disappearing from the model.
    """
    if dxo is None or not dxo.data:
        return global_weights
    out = dict(global_weights)
    if dxo.kind == WEIGHTS:
        for k, v in dxo.data.items():
            # an assembled message owns its (writable) buffer: keep it; a read-only view is copied
            out[k] = v if v.flags.writeable else np.array(v)
    elif dxo.kind == WEIGHT_DIFF:
        for k, v in dxo.data.items():
            if k not in global_weights:
                raise SagmqError(f"WEIGHT_DIFF carries variable {k!r}, which the global model lacks")
            base = global_weights[k]
            out[k] = (base + v).astype(base.dtype, copy=False)
    else:
        raise SagmqError(f"FullModelShareableGenerator cannot apply a {dxo.kind} aggregate")
    return out
