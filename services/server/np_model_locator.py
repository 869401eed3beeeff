"""NPModelLocator as NVFlare names it: the server models cross-site evaluation validates.

NVFlare's locator reads model_dir/model_name from the server's run folder. In sagmq the server's
final global model is what the persistor saved there at the end of ScatterAndGather, and the
server still holds it in memory when CrossSiteModelEval starts, so the locator takes it from there
(the job spec refuses a locator that points at any other file). Each located model is validated
under NVFlare's name for it, ``SRV_<name>`` (``SRV_server``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from sagmq.job.cross_site_spec import SERVER_MODEL_PREFIX, LocatorConfig
from sagmq.wire.codec import DXO, WEIGHTS


class NPModelLocator:
    """Finds the server models for cross-site evaluation (the final global model, as NVFlare's "server")."""

    def __init__(self, cfg: LocatorConfig, global_model: Mapping[str, np.ndarray]) -> None:
        self.cfg = cfg
        self.global_model = dict(global_model)

    def get_model_names(self) -> list[str]:
        """The locator's model names (NVFlare's keys of model_name: ["server"])."""
        return [name for name, _ in self.cfg.model_names]

    def locate_model(self, name: str) -> DXO | None:
        """The model of that name as a WEIGHTS DXO, or None when there is none (no model was trained)."""
        if name not in self.get_model_names() or not self.global_model:
            return None
        return DXO(WEIGHTS, dict(self.global_model))

    def server_models(self) -> dict[str, DXO]:
        """Every located model by the name it is validated under (SRV_server)."""
        out: dict[str, DXO] = {}
        for name in self.get_model_names():
            dxo = self.locate_model(name)
            if dxo is not None:
                out[SERVER_MODEL_PREFIX + name] = dxo
        return out
