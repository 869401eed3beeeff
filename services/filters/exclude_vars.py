"""ExcludeVars (NVFlare's filter of that name): remove variables from a DXO before it goes on."""

from __future__ import annotations

import re
from typing import Any

from sagmq.filters.base import DXOFilter, FilterContext
from sagmq.wire.codec import DXO


class ExcludeVars(DXOFilter):
    """exclude_vars: a list of variable names (removed exactly), or a regular expression (variables whose
    name it matches anywhere are removed); None or "" removes nothing. data_kinds: WEIGHTS and
    WEIGHT_DIFF by default."""

    def __init__(self, exclude_vars: list[str] | str | None = None, data_kinds: list[str] | None = None) -> None:
        super().__init__(data_kinds)
        self.names: frozenset[str] | None = None
        self.pattern: re.Pattern[str] | None = None
        if isinstance(exclude_vars, list):
            if not all(isinstance(v, str) for v in exclude_vars):
                raise ValueError("exclude_vars must list variable names (strings)")
            self.names = frozenset(exclude_vars)
        elif isinstance(exclude_vars, str):
            self.pattern = re.compile(exclude_vars) if exclude_vars else None
        elif exclude_vars is not None:
            raise ValueError(f"exclude_vars must be a list of names or a regular expression, not {exclude_vars!r}")

    def excluded(self, name: str) -> bool:
        """Whether a variable is removed."""
        if self.names is not None:
            return name in self.names
        return self.pattern is not None and self.pattern.search(name) is not None

    def process_dxo(self, dxo: DXO, ctx: FilterContext) -> DXO:
        """The DXO without the excluded variables (meta unchanged)."""
        if self.names is None and self.pattern is None:
            return dxo
        kept: dict[str, Any] = {k: v for k, v in dxo.data.items() if not self.excluded(k)}
        gone = len(dxo.data) - len(kept)
        if self.pattern is not None and gone == 0:
            ctx.log.warning("ExcludeVars: no variable matches %r (job %s, %s)", self.pattern.pattern, ctx.job_id,
                            ctx.site)
        ctx.log.info("ExcludeVars: %d of %d variable(s) removed (job %s round %d, %s)", gone, len(dxo.data),
                     ctx.job_id, ctx.round, ctx.site)
        return DXO(dxo.kind, kept, dict(dxo.meta))
