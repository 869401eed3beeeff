"""SVTPrivacy (NVFlare's filter of that name): the Sparse Vector Technique of differential privacy.

The update (divided by NUM_STEPS_CURRENT_ROUND) is flattened over its variables in name order.
n_upload = ceil(size × fraction) entries are released: a threshold tau plus Laplace noise of
scale 2·gamma/epsilon; entries whose clipped magnitude plus Laplace noise (scale
4·gamma·n_upload/eps_2, eps_2 = epsilon·(2·n_upload)^(2/3)) reach it are accepted, repeatedly
over the rest until enough are; n_upload of them are drawn (with replacement if replace), get
Laplace noise of scale 2·gamma/noise_var and are clipped to [-gamma, gamma]; every other entry
is zeroed. The result is multiplied by the step count again; a 0-d variable passes unchanged.

NVFlare's later releases add epsilon_threshold, epsilon_query and epsilon_release, which split
the budget explicitly (threshold noise gamma/eps_threshold, query noise
2·gamma·n_upload/eps_query, release noise 2·gamma·n_upload/eps_release, eps_release defaulting
to n_upload·noise_var; an unset one of the first two is the rest of epsilon, both unset: the
standard 1 : (2·n_upload)^(2/3) split). A job that sets any of them gets that accounting;
one that sets none gets the classic one above.
"""

from __future__ import annotations

import math

import numpy as np

from sagmq.filters.base import DXOFilter, FilterContext
from sagmq.wire.codec import DXO

NUM_STEPS = "NUM_STEPS_CURRENT_ROUND"


class SVTPrivacy(DXOFilter):
    """fraction (0.1), epsilon (0.1), noise_var (0.1), gamma (1e-5), tau (1e-6), data_kinds, replace (True).
    rng: the random generator (tests pass a seeded one)."""

    def __init__(self, fraction: float = 0.1, epsilon: float = 0.1, noise_var: float = 0.1, gamma: float = 1e-5,
                 tau: float = 1e-6, data_kinds: list[str] | None = None, replace: bool = True,
                 epsilon_threshold: float | None = None, epsilon_query: float | None = None,
                 epsilon_release: float | None = None, rng: np.random.Generator | None = None) -> None:
        super().__init__(data_kinds)
        if not 0 < fraction <= 1 or epsilon <= 0 or noise_var <= 0 or gamma <= 0:
            raise ValueError("SVTPrivacy needs 0 < fraction <= 1 and epsilon, noise_var, gamma > 0")
        if any(e is not None and e <= 0 for e in (epsilon_threshold, epsilon_query, epsilon_release)):
            raise ValueError("epsilon_threshold, epsilon_query and epsilon_release must be > 0")
        if epsilon_threshold is not None and epsilon_query is not None and \
                not math.isclose(epsilon_threshold + epsilon_query, epsilon):
            raise ValueError("epsilon_threshold + epsilon_query must equal epsilon")
        if (epsilon_threshold or 0) >= epsilon or (epsilon_query or 0) >= epsilon:
            raise ValueError("epsilon_threshold and epsilon_query must each be below epsilon")
        self.fraction, self.epsilon, self.noise_var = fraction, epsilon, noise_var
        self.gamma, self.tau, self.replace = gamma, tau, replace
        self.epsilon_threshold, self.epsilon_query, self.epsilon_release = epsilon_threshold, epsilon_query, \
            epsilon_release
        self.rng = rng or np.random.default_rng()

    def scales(self, n_upload: int) -> tuple[float, float, float]:
        """The Laplace scales of the threshold, query and release noise for n_upload released values."""
        if self.epsilon_threshold is None and self.epsilon_query is None and self.epsilon_release is None:
            eps_2 = self.epsilon * (2.0 * n_upload) ** (2.0 / 3.0)  # the classic accounting
            return self.gamma * 2.0 / self.epsilon, self.gamma * 4.0 * n_upload / eps_2, self.gamma * 2.0 / self.noise_var
        eps_t, eps_q = self.epsilon_threshold, self.epsilon_query
        if eps_t is None and eps_q is None:
            eps_t = self.epsilon / (1.0 + (2.0 * n_upload) ** (2.0 / 3.0))
        eps_t = self.epsilon - eps_q if eps_t is None and eps_q is not None else eps_t
        assert eps_t is not None
        eps_q = self.epsilon - eps_t if eps_q is None else eps_q
        eps_r = self.epsilon_release if self.epsilon_release is not None else n_upload * self.noise_var
        return self.gamma / eps_t, self.gamma * 2.0 * n_upload / eps_q, self.gamma * 2.0 * n_upload / eps_r

    def process_dxo(self, dxo: DXO, ctx: FilterContext) -> DXO:
        """The sparse, noised update."""
        if not dxo.data:
            return dxo
        steps = float(dxo.meta.get(NUM_STEPS, 1))
        names = sorted(dxo.data)
        delta = np.concatenate([np.asarray(dxo.data[k], dtype=np.float64).ravel() / steps for k in names])
        n_upload = min(math.ceil(delta.size * self.fraction), delta.size)
        lambda_rho, lambda_nu, release = self.scales(n_upload)
        chosen, rest = self._select(delta, n_upload, lambda_rho, lambda_nu)
        noise = self.rng.laplace(scale=release, size=chosen.shape)
        delta[chosen] = np.clip(delta[chosen] + noise, -self.gamma, self.gamma)
        delta[np.setdiff1d(np.arange(delta.size), chosen)] = 0.0
        out: dict[str, np.ndarray] = {}
        start = 0
        for k in names:
            v = np.asarray(dxo.data[k])
            if v.ndim == 0:
                out[k] = v
                start += 1
                continue
            out[k] = delta[start:start + v.size].reshape(v.shape) * steps
            start += v.size
        ctx.log.info("SVTPrivacy: %d of %d value(s) released (%d left unselected), job %s round %d, %s",
                     len(np.unique(chosen)), delta.size, rest, ctx.job_id, ctx.round, ctx.site)
        return DXO(dxo.kind, out, dict(dxo.meta))

    def _select(self, delta: np.ndarray, n_upload: int, lambda_rho: float,
                lambda_nu: float) -> tuple[np.ndarray, int]:
        """Indices released (n_upload of them) and how many candidates were never above the threshold."""
        threshold = self.tau + self.rng.laplace(scale=lambda_rho)
        clipped = np.abs(np.clip(delta, -self.gamma, self.gamma))
        accepted: list[int] = []
        candidates = np.arange(delta.size)
        while len(accepted) < n_upload:
            nu = self.rng.laplace(scale=lambda_nu, size=candidates.shape)
            above = clipped[candidates] + nu >= threshold
            accepted += candidates[above].tolist()
            candidates = candidates[~above]
        chosen = self.rng.choice(np.array(accepted), size=n_upload, replace=self.replace)
        return chosen, int(candidates.size)
