"""Filters of tasks and results (NVFlare's task_data_filters and task_result_filters).

A job's custom filter subclasses ``Filter`` (or ``DXOFilter``) from here.
"""

from sagmq.filters.base import (
    RC_TASK_DATA_FILTER_ERROR,
    RC_TASK_RESULT_FILTER_ERROR,
    TASK_DATA,
    TASK_RESULT,
    DXOFilter,
    Filter,
    FilterContext,
    FilterError,
)
from sagmq.filters.exclude_vars import ExcludeVars
from sagmq.filters.percentile_privacy import PercentilePrivacy
from sagmq.filters.svt_privacy import SVTPrivacy
from sagmq.wire.codec import DXO, WEIGHT_DIFF, WEIGHTS

__all__ = [
    "DXO", "WEIGHTS", "WEIGHT_DIFF", "Filter", "DXOFilter", "FilterContext", "FilterError", "ExcludeVars",
    "PercentilePrivacy", "SVTPrivacy", "TASK_DATA", "TASK_RESULT", "RC_TASK_DATA_FILTER_ERROR",
    "RC_TASK_RESULT_FILTER_ERROR",
]
