"""NPFormatter and ValidationJsonGenerator as NVFlare names them: cross-site results as text and as JSON.

Both read the matrix CrossSiteModelEval gathers, ``{data_client: {model_owner: METRICS DXO}}``. The
formatter renders it for people (the server's log and `sagmq status`); the JSON generator gives the
``{data_client: {model_owner: {"accuracy": v}}}`` map NVFlare writes as cross_val_results.json. A
metric travels as an array (the wire's DXO carries arrays only); a one-element array becomes a plain
number again here, a longer one a list.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from sagmq.wire.codec import DXO, METRICS

Matrix = Mapping[str, Mapping[str, DXO]]


def metric_value(a: np.ndarray) -> Any:
    """A metric as JSON holds it: a number for a scalar, else a (nested) list."""
    arr = np.asarray(a)
    return arr.reshape(()).item() if arr.size == 1 else arr.tolist()


def metrics_of(dxo: DXO) -> dict[str, Any]:
    """A METRICS DXO's values as plain numbers ({} for any other kind)."""
    if dxo.kind != METRICS:
        return {}
    return {name: metric_value(v) for name, v in dxo.data.items()}


class ValidationJsonGenerator:
    """The cross_val_results.json map: only results that came as METRICS, as NVFlare's generator does."""

    def generate(self, matrix: Matrix) -> dict[str, dict[str, dict[str, Any]]]:
        """{data_client: {model_owner: {metric: value}}}."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for client, row in matrix.items():
            for owner, dxo in row.items():
                if dxo.kind == METRICS:
                    out.setdefault(client, {})[owner] = metrics_of(dxo)
        return out


class NPFormatter:
    """Cross-site results as a readable text, one line per data client."""

    def format(self, matrix: Matrix) -> str:
        """e.g. ``site-1: SRV_server accuracy=3.51, site-1 accuracy=3.2`` (one line per site)."""
        lines = []
        for client in sorted(matrix):
            row = matrix[client]
            cells = [f"{owner} " + " ".join(f"{k}={_short(v)}" for k, v in metrics_of(row[owner]).items())
                     for owner in sorted(row) if row[owner].kind == METRICS]
            lines.append(f"{client}: {', '.join(cells) if cells else '(no results)'}")
        return "\n".join(lines)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
