"""Filter: what a job's filters (NVFlare's task_data_filters / task_result_filters) implement.

A filter takes a DXO and returns the DXO to pass on (a new one, or the same). Filters run in
the order the job lists them, at four points: the server's task_data_filters before a task
leaves the server, a site's task_data_filters before its executor sees the task, a site's
task_result_filters before its result leaves the site, the server's task_result_filters before
the aggregator counts a result. A job's own filter (app/custom/) subclasses Filter (or
DXOFilter), takes its config args as keyword arguments and, on a site, runs only when the site
allows custom code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sagmq.wire.codec import COLLECTION, DXO, WEIGHT_DIFF, WEIGHTS, collection

# NVFlare's return codes for a filter that failed (the task, or the result, goes no further)
RC_TASK_DATA_FILTER_ERROR = "TASK_DATA_FILTER_ERROR"
RC_TASK_RESULT_FILTER_ERROR = "TASK_RESULT_FILTER_ERROR"

TASK_DATA = "task_data_filters"
TASK_RESULT = "task_result_filters"


class FilterError(Exception):
    """A filter refused or failed: the text says why."""


@dataclass(slots=True)
class FilterContext:
    """Where a filter runs: the side ('server' or a site name), the job, round and task, the direction."""

    site: str
    job_id: str
    round: int
    task_name: str
    direction: str  # TASK_DATA or TASK_RESULT
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("sagmq.filter"))


class Filter:
    """Base class of filters; one instance serves a job on one side."""

    def process(self, dxo: DXO, ctx: FilterContext) -> DXO:  # pragma: no cover - interface
        """Return the DXO to pass on (never change the arrays of the one given: they may be read-only)."""
        raise NotImplementedError


class DXOFilter(Filter):
    """A filter of some data kinds (NVFlare's DXOFilter): DXOs of other kinds pass unchanged."""

    supported_kinds: tuple[str, ...] = (WEIGHTS, WEIGHT_DIFF)

    def __init__(self, data_kinds: list[str] | None = None) -> None:
        kinds = list(data_kinds) if data_kinds else [WEIGHT_DIFF, WEIGHTS]
        bad = [k for k in kinds if k not in self.supported_kinds]
        if bad:
            raise ValueError(f"{type(self).__name__} does not filter data kind(s) {bad}; "
                             f"it supports {list(self.supported_kinds)}")
        self.data_kinds = kinds

    def process(self, dxo: DXO, ctx: FilterContext) -> DXO:
        """Filter the DXO if it is of a kind to filter; a COLLECTION's sub-DXOs each, as NVFlare's DXOFilter."""
        if dxo.kind == COLLECTION:
            return collection({k: self.process(v, ctx) for k, v in dxo.subs.items()}, dxo.meta)
        if dxo.kind not in self.data_kinds:
            ctx.log.debug("%s: data kind %s is not filtered", type(self).__name__, dxo.kind)
            return dxo
        return self.process_dxo(dxo, ctx)

    def process_dxo(self, dxo: DXO, ctx: FilterContext) -> DXO:  # pragma: no cover - interface
        """Filter a DXO of one of data_kinds."""
        raise NotImplementedError
