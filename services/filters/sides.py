"""Where the server side's filters run: task_data_filters in the server, task_result_filters in the aggregator.

The server's task_data_filters run in the server service just before a task is sent (the model
leaves filtered, once, and the broker copies the filtered body to every target). The server's
task_result_filters run in the aggregator service, on each result before it is accumulated: the
aggregator is the service that receives results (they never pass through the server), so that is
the last point before they are counted. The round.open of each round carries them there
(built-in filters only: sagmq runs no job code on the server side). The results that do come to
the server (cross-site evaluation's submit_model and validate answers) get them in the server.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from sagmq.filters.base import RC_TASK_RESULT_FILTER_ERROR, TASK_DATA, TASK_RESULT, FilterContext, FilterError
from sagmq.filters.chain import FilterChain, Filters, FilterSpec, build
from sagmq.filters.exclude_vars import ExcludeVars
from sagmq.wire.messages import RC_OK, TaskResult, TrainTask

log = logging.getLogger(__name__)
SERVER = "server"


def server_task_data(filters: Filters, task: TrainTask) -> TrainTask | None:
    """The task with its DXO through the server's task_data_filters; None (logged) if a filter failed:
    a task is never sent unfiltered."""
    chain = build({TASK_DATA: filters.get(TASK_DATA, [])})
    if not chain.for_task(TASK_DATA, task.task_name):
        return task
    try:
        dxo = chain.run(TASK_DATA, task.dxo, FilterContext(SERVER, task.job_id, task.round, task.task_name, TASK_DATA))
    except FilterError as e:
        log.error("job %s round %d: the server's task_data_filters failed on task %s: %s; the task is not sent",
                  task.job_id, task.round, task.task_name, e)
        return None
    return replace(task, dxo=dxo)


def server_task_result(filters: Filters, r: TaskResult) -> TaskResult:
    """A result that comes to the server itself (cross-site evaluation's) through the server's
    task_result_filters; a filter that fails turns it into NVFlare's TASK_RESULT_FILTER_ERROR (logged)."""
    chain = build({TASK_RESULT: filters.get(TASK_RESULT, [])})
    if r.rc != RC_OK or r.dxo is None or not chain.for_task(TASK_RESULT, r.task_name):
        return r
    try:
        dxo = chain.run(TASK_RESULT, r.dxo, FilterContext(SERVER, r.job_id, r.round, r.task_name, TASK_RESULT))
    except FilterError as e:
        log.error("job %s: the server's task_result_filters failed on the %s result of %s: %s", r.job_id,
                  r.task_name, r.site, e)
        return replace(r, rc=RC_TASK_RESULT_FILTER_ERROR, dxo=None, error=str(e))
    return replace(r, dxo=dxo)


def result_filters_to_wire(filters: Filters) -> list[dict[str, Any]]:
    """The server's task_result_filters as round.open carries them to the aggregator."""
    return [f.to_wire() for f in filters.get(TASK_RESULT, [])]


def result_chain_from_wire(entries: list[dict[str, Any]]) -> FilterChain:
    """The aggregator's chain from a round.open's result_filters (FilterError if one is not a built-in)."""
    return build({TASK_RESULT: [FilterSpec.from_wire(e) for e in entries]})


def only_excludes(chain: FilterChain, task_name: str) -> list[ExcludeVars] | None:
    """The task's result filters if every one is an ExcludeVars (which can be applied to a streamed result's
    header: it only drops variables), else None."""
    fs = chain.for_task(TASK_RESULT, task_name)
    return [f for f in fs if isinstance(f, ExcludeVars)] if all(isinstance(f, ExcludeVars) for f in fs) else None
