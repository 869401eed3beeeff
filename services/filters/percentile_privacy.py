"""PercentilePrivacy (NVFlare's filter of that name): share only the largest changes, clipped.

Shokri and Shmatikov, "Privacy-preserving deep learning" (CCS '15). The update is divided by
the contribution's NUM_STEPS_CURRENT_ROUND (default 1); the cutoff is the given percentile of
the absolute values over every variable together; values strictly inside (-cutoff, cutoff) are
zeroed, the rest clipped to [-gamma, gamma]; the result is multiplied by the step count again.
A 0-d variable passes unchanged. gamma <= 0 or a percentile outside 0..100 leaves the DXO as it
is, as NVFlare does.
"""

from __future__ import annotations

import numpy as np

from sagmq.filters.base import DXOFilter, FilterContext
from sagmq.wire.codec import DXO

NUM_STEPS = "NUM_STEPS_CURRENT_ROUND"


class PercentilePrivacy(DXOFilter):
    """percentile (0..100, default 10), gamma (> 0, default 0.01), data_kinds (WEIGHTS, WEIGHT_DIFF)."""

    def __init__(self, percentile: float = 10, gamma: float = 0.01, data_kinds: list[str] | None = None) -> None:
        super().__init__(data_kinds)
        self.percentile = percentile
        self.gamma = gamma

    def process_dxo(self, dxo: DXO, ctx: FilterContext) -> DXO:
        """The truncated, clipped update."""
        if self.gamma <= 0 or not 0 <= self.percentile <= 100:
            ctx.log.info("PercentilePrivacy: gamma %s, percentile %s: nothing done", self.gamma, self.percentile)
            return dxo
        if not dxo.data:
            return dxo
        steps = dxo.meta.get(NUM_STEPS, 1)
        scaled = {k: np.asarray(v) / steps for k, v in dxo.data.items()}
        magnitudes = np.concatenate([np.abs(v).ravel() for v in scaled.values()])
        cutoff = np.percentile(magnitudes, self.percentile)
        out: dict[str, np.ndarray] = {}
        for k, v in scaled.items():
            if v.ndim == 0:
                out[k] = v * steps
                continue
            small = (v > -cutoff) & (v < cutoff)
            v[small] = 0.0  # v is the division's own new array
            out[k] = np.clip(v, -self.gamma, self.gamma) * steps
        ctx.log.info("PercentilePrivacy: cutoff %g at the %g percentile of |delta| (max %g), job %s round %d, %s",
                     cutoff, self.percentile, float(magnitudes.max(initial=0.0)), ctx.job_id, ctx.round, ctx.site)
        return DXO(dxo.kind, out, dict(dxo.meta))
