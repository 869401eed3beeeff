"""InTimeAccumulateWeightedAggregator: one round's weighted average, accumulated as results come.

NVFlare's component of that name, as plain numpy (no broker, no logging). The weight of a
contribution is aggregation_weights.get(site, 1.0) × meta NUM_STEPS_CURRENT_ROUND (default
1). Per variable k the aggregate is Σ w_i·x_i[k] / Σ w_i over the contributions that carry
k. One instance per round; memory is one model (the running sums) whatever the number of
sites.

A contribution arrives either whole (``accept``) or, when it is large, as a blob streamed
part by part (``begin_stream`` with its header, then ``add_part`` for each data part, in
any order): each part is checked and added to the sums as it comes, so a large result is
never held whole. A whole contribution is checked completely before any of it is added, so
a rejected one leaves nothing behind. A streamed one can only be checked part by part: if
a later part is refused after earlier ones were added, the sums are ``spoiled`` and the
host must rebuild the round without it.

The arithmetic is NVFlare's: a variable's sum takes the dtype NVFlare's ``v * weight`` gives
(a float variable keeps its float dtype, an integer one is summed in float64; float32 and
float64 contributions sum in float64), and the mean is ``sum * (1.0 / Σ w)`` with no cast back
to the global model's dtype: the mean of int64 [1, 2] and [4, 6] is [2.5, 4.0]. A contribution
with no variable left to aggregate (empty, or every variable excluded) is accepted and counted,
and a variable the global model lacks is aggregated too, as NVFlare does. Where sagmq is
deliberately stricter (the README's "Departures from NVFlare"), the reason says so, and what
happened without a refusal is noted in ``notes`` for the host to log.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sagmq.wire.blob import PartSet, check_data_part, refs
from sagmq.wire.codec import COLLECTION, DATA_KINDS, DXO, WEIGHT_DIFF, check_plain
from sagmq.wire.errors import DecodeError, Rejected
from sagmq.wire.messages import RC_OK

NUM_STEPS = "NUM_STEPS_CURRENT_ROUND"

# where an array lies in a blob's raw section: offset, nbytes, dtype, shape (see sagmq.wire.blob.refs)
ArrayRef = tuple[int, int, np.dtype[Any], tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class VarSpec:
    """dtype and shape a variable must have (those of the global model)."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(slots=True)
class _Stream:
    """A large contribution being added part by part."""

    site: str
    weight: float
    refs: dict[str, ArrayRef]  # only the variables to add
    size: int
    parts: PartSet
    added: bool = False  # some of its values are in the sums already


@dataclass(frozen=True, slots=True)
class StreamHeader:
    """The header part of a streamed contribution: its DXO with arrays as references into the parts."""

    kind: str | None
    arrays: dict[str, ArrayRef]
    meta: Mapping[str, Any]
    parts: int
    size: int


def read_stream_header(dxo: Any, parts: int, size: int) -> StreamHeader:
    """Validate the DXO map of a header part (DecodeError if malformed)."""
    if not isinstance(dxo, dict) or set(dxo) != {"kind", "data", "meta"} or not isinstance(dxo["data"], dict):
        raise DecodeError("result.dxo: expected a map with kind, data and meta")
    meta = check_plain(dxo["meta"], "result.dxo.meta")
    kind = dxo["kind"] if isinstance(dxo["kind"], str) else None
    if kind == COLLECTION:  # its arrays lie one level deeper; no aggregator streams it (the verdict says so)
        return StreamHeader(kind, {}, meta if isinstance(meta, dict) else {}, parts, size)
    arrays: dict[str, ArrayRef] = {}
    for name, ref in dxo["data"].items():
        (arrays[name],) = refs(ref, size, where=f"result.dxo.data[{name!r}]")
    return StreamHeader(kind, arrays, meta if isinstance(meta, dict) else {}, parts, size)


@dataclass(slots=True)
class StreamStatus:
    """What one part did to its stream."""

    site: str
    complete: bool  # every part is in: the contribution is counted
    duplicate: bool = False  # the part had come before: nothing was added


class InTimeAccumulateWeightedAggregator:
    """The running weighted sum of one round: NVFlare's arguments, plus the round's target sites and
    the global model's spec (dtype and shape per variable; empty: anything numeric is taken)."""

    def __init__(
        self,
        expected_data_kind: str = WEIGHT_DIFF,
        aggregation_weights: Mapping[str, float] | None = None,
        exclude_vars: str | None = None,
        weigh_by_local_iter: bool = True,
        *,
        targets: Iterable[str] = (),
        spec: Mapping[str, VarSpec] | None = None,
    ) -> None:
        self.expected_data_kind = expected_data_kind
        self.aggregation_weights: dict[str, float] = dict(aggregation_weights or {})
        self.exclude_vars = exclude_vars or ""
        self.weigh_by_local_iter = weigh_by_local_iter
        self.targets = frozenset(targets)
        self.spec: dict[str, VarSpec] = dict(spec or {})
        self.sums: dict[str, np.ndarray] = {}
        self.weights: dict[str, float] = {}
        self.accepted: list[str] = []
        self.spoiled = False  # a refused stream had added values: the sums are not this round's any more
        self._streams: dict[str, _Stream] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}  # shape of each variable seen (the model's, or the first)
        self.notes: list[str] = []  # departures from NVFlare that happened without a refusal, for the log
        self._exclude = re.compile(self.exclude_vars) if self.exclude_vars else None
        self._scratch: dict[np.dtype[Any], np.ndarray] = {}  # add_weighted's buffers, by dtype

    # --- whole contributions ------------------------------------------------------------

    def accept(self, site: str, rc: str, dxo: DXO | None, error: str = "") -> None:
        """Check a whole contribution, then add it to the sums; or raise Rejected with the reason."""
        weight, names = self.check_whole(site, rc, dxo, error)
        assert dxo is not None  # check_whole refuses a missing DXO
        self.add_whole(site, dxo, weight, names)

    def check_whole(self, site: str, rc: str, dxo: DXO | None, error: str = "") -> tuple[float, list[str]]:
        """Check a whole contribution without adding it: its weight and the variables to add, or Rejected."""
        variables = {k: (v.dtype.str, tuple(v.shape)) for k, v in dxo.data.items()} if dxo else {}
        weight, names = self.check_header(site, rc, dxo.kind if dxo else None, dxo.meta if dxo else {},
                                          variables, error)
        assert dxo is not None  # check_header refuses a missing DXO
        for name in names:
            self.check_values(name, dxo.data[name])
        return weight, names

    def add_whole(self, site: str, dxo: DXO, weight: float, names: list[str]) -> None:
        """Add a contribution that check_whole passed, and count it."""
        for name in names:
            arr = dxo.data[name]
            self._add_values(name, 0, arr.reshape(-1), weight, tuple(arr.shape))
        self._count(site, names, weight)

    def check_header(
        self, site: str, rc: str, kind: str | None, meta: Mapping[str, Any],
        variables: Mapping[str, tuple[str, tuple[int, ...]]], error: str = "",
    ) -> tuple[float, list[str]]:
        """Check everything but the values; return the weight and the variables to add, or raise Rejected."""
        self._check_sender(site, rc, error)
        self._check_kind(site, kind)
        weight = float(self.aggregation_weights.get(site, 1.0)) * _steps(meta)
        names = [name for name, (dtype, shape) in variables.items() if self._wanted(name, dtype, shape)]
        for name in names:  # a variable the model lacks: the first contribution that carries it sets its shape
            self.shapes.setdefault(name, tuple(variables[name][1]))
        return weight, names

    def _check_sender(self, site: str, rc: str, error: str) -> None:
        if rc != RC_OK:
            raise Rejected(f"site {site} returned rc {rc}: {error or 'no reason given'}")
        if site not in self.targets:
            raise Rejected(f"site {site} is not a target of this round")

    def _check_kind(self, site: str, kind: str | None) -> None:
        if kind is None:
            raise Rejected(f"site {site} sent no DXO")
        if kind == COLLECTION and kind != self.expected_data_kind:
            raise Rejected(f"expected data kind {self.expected_data_kind} but got a COLLECTION (the job's "
                           f"expected_data_kind is one kind, not a dict of keys)")
        if kind not in DATA_KINDS:
            raise Rejected(f"cannot handle data kind {kind!r}")
        if kind != self.expected_data_kind:
            raise Rejected(f"expected data kind {self.expected_data_kind} but got {kind}")
        if site in self.accepted:
            raise Rejected(f"duplicate: a contribution from site {site} was already accepted this round")
        if any(st.site == site for st in self._streams.values()):
            raise Rejected(f"duplicate: site {site} is already sending a result this round")

    def _wanted(self, name: str, dtype: str, shape: tuple[int, ...]) -> bool:
        """Whether a variable is aggregated (False if excluded); Rejected if it does not fit the model."""
        if self._exclude is not None and self._exclude.search(name):
            return False  # skipped before its shape or values are looked at
        want = self.spec.get(name)
        have = want.shape if want is not None else self.shapes.get(name)
        if have is not None and tuple(shape) != have:
            where = "the model has" if want is not None else "an earlier contribution had"
            raise Rejected(f"variable {name!r} has shape {tuple(shape)}, {where} {have}")
        if np.dtype(dtype).kind not in "fiu":
            raise Rejected(f"variable {name!r} has non-numeric dtype {dtype}")
        return True

    @staticmethod
    def check_values(name: str, values: np.ndarray) -> None:
        """Refuse NaN and Inf (min and max propagate NaN: no model-sized array of booleans is made)."""
        if values.dtype.kind == "f" and values.size and not (np.isfinite(values.min()) and np.isfinite(values.max())):
            raise Rejected(f"variable {name!r} holds NaN or Inf")

    # --- streamed contributions -----------------------------------------------------------

    def begin_stream(self, blob: str, site: str, rc: str, header: StreamHeader, error: str = "") -> StreamStatus:
        """Open a large contribution from its header part (Rejected if it is refused); part 0 is taken."""
        weight, names = self.check_header(site, rc, header.kind, header.meta,
                                          {k: (v[2].str, v[3]) for k, v in header.arrays.items()}, error)
        stream = _Stream(site, weight, {k: header.arrays[k] for k in names}, header.size, PartSet(header.parts))
        self._streams[blob] = stream
        return self._take(blob, stream, 0)

    def streaming(self, blob: str) -> bool:
        """Whether a blob is a contribution being streamed into this round."""
        return blob in self._streams

    def add_part(self, blob: str, idx: int, headers: Mapping[str, Any], body: bytes) -> StreamStatus:
        """Check and add one data part of a streamed contribution (parts come in any order; a duplicate
        is ignored). A bad part refuses the whole contribution: Rejected, after drop_stream."""
        stream = self._streams[blob]
        if stream.parts.seen(idx):
            return StreamStatus(stream.site, False, duplicate=True)
        if idx > 0:
            try:
                off = check_data_part(headers, body, stream.size)
                self._add_part_values(stream, off, body)
            except (DecodeError, Rejected) as e:
                self.drop_stream(blob)
                raise Rejected(str(e)) from e
        return self._take(blob, stream, idx)

    def _take(self, blob: str, stream: _Stream, idx: int) -> StreamStatus:
        """Count part idx; once every part is in, count the contribution."""
        if not stream.parts.add(idx):
            return StreamStatus(stream.site, False)
        del self._streams[blob]
        self._count(stream.site, list(stream.refs), stream.weight)
        return StreamStatus(stream.site, True)

    def _add_part_values(self, stream: _Stream, off: int, body: bytes) -> None:
        """Add the values a data part carries (all of them checked before any is added)."""
        end = off + len(body)
        runs = []
        for name, (aoff, nbytes, dt, shape) in stream.refs.items():
            lo, hi = max(off, aoff), min(end, aoff + nbytes)
            if lo >= hi:
                continue
            values = np.frombuffer(body, dtype=dt, count=(hi - lo) // dt.itemsize, offset=lo - off)
            self.check_values(name, values)
            runs.append((name, (lo - aoff) // dt.itemsize, values, shape))
        for name, start, values, shape in runs:
            self._add_values(name, start, values, stream.weight, shape)
            stream.added = True

    def drop_stream(self, blob: str) -> bool:
        """Forget a streamed contribution that will not be counted; True if the sums were spoiled by it."""
        stream = self._streams.pop(blob, None)
        if stream is not None and stream.added:
            self.spoiled = True
            return True
        return False

    def stale_streams(self, now: float, timeout_s: float) -> dict[str, str]:
        """Streams with no part for timeout_s seconds, with the reason to refuse them."""
        return {
            blob: f"parts {st.parts.missing()[:10]} of {st.parts.parts} missing after {timeout_s:g} s"
            for blob, st in self._streams.items() if st.parts.stale(now, timeout_s)
        }

    # --- the sums -------------------------------------------------------------------------

    def _sum(self, name: str, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        """The running sum of a variable, in the dtype NVFlare's ``v * weight`` gives (widened as needed)."""
        dt = sum_dtype(dtype)
        acc = self.sums.get(name)
        if acc is None:
            acc = self.sums[name] = np.zeros(shape, dtype=dt)
            self.weights[name] = 0.0
        elif np.result_type(acc.dtype, dt) != acc.dtype:  # a wider contribution: float32 + float64 -> float64
            acc = self.sums[name] = acc.astype(np.result_type(acc.dtype, dt))
        return acc

    def _add_values(self, name: str, start: int, values: np.ndarray, weight: float, shape: tuple[int, ...]) -> None:
        """Add a flat run of a variable's values (starting at element start) to its sum, in place."""
        acc = self._sum(name, values.dtype, shape).reshape(-1)
        target = acc[start:start + values.size]
        if self.weigh_by_local_iter:  # v * weight in v's own float dtype, a scratch buffer at a time
            add_weighted(target, values, sum_dtype(values.dtype).type(weight), self._scratch)
        else:
            target += values  # (a cast to the sum's dtype goes through numpy's small buffers)

    def _count(self, site: str, names: list[str], weight: float) -> None:
        """Count a contribution whose values were all added."""
        for name in names:
            self.weights[name] = self.weights.get(name, 0.0) + weight
        self.accepted.append(site)

    def aggregate(self) -> DXO | None:
        """The weighted average (None if nothing was accepted); variables with zero weight are left out.
        The sums are divided in place: call it once, at the end of the round."""
        if not self.accepted:
            return None
        out: dict[str, np.ndarray] = {}
        for name, acc in self.sums.items():
            w = self.weights.get(name, 0.0)
            if w != 0:
                acc *= acc.dtype.type(1.0 / w)  # NVFlare's v * (1.0 / count), in the sum's own dtype
                out[name] = acc
            else:
                self.notes.append(f"variable {name!r}: every contribution weighs 0, so it keeps its global value "
                                  f"(departure from NVFlare, which fails on the division by zero)")
        meta: dict[str, Any] = {"accepted": list(self.accepted)}
        return DXO(self.expected_data_kind, out, meta)


SCRATCH_ELEMENTS = 1 << 16  # add_weighted's buffer: 512 KiB of float64 at most, however large the model


def add_weighted(target: np.ndarray, values: np.ndarray, weight: np.generic,
                 scratch: dict[np.dtype[Any], np.ndarray]) -> None:
    """``target += values * weight``, bit for bit, without a model-sized temporary: each slice's
    product is made in a reused buffer of the product's own dtype (the same multiplication, so the
    same rounding), then added. target and values are flat and of one length."""
    dt = (values[:0] * weight).dtype
    buf = scratch.get(dt)
    if buf is None:
        buf = scratch[dt] = np.empty(SCRATCH_ELEMENTS, dtype=dt)
    for lo in range(0, values.size, SCRATCH_ELEMENTS):
        part = values[lo:lo + SCRATCH_ELEMENTS]
        prod = buf[:part.size]
        np.multiply(part, weight, out=prod)
        target[lo:lo + part.size] += prod


def sum_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype of ``v * weight`` (a Python float) for an array v of this dtype: floats keep theirs."""
    return dtype if dtype.kind == "f" else np.dtype(np.float64)


def _steps(meta: Mapping[str, Any]) -> float:
    """A contribution's NUM_STEPS_CURRENT_ROUND (default 1, also for None) as NVFlare reads it, float(value);
    a negative or non-finite count is refused (departure from NVFlare: it would weigh the contribution
    negatively or spoil the sums)."""
    steps = meta.get(NUM_STEPS)
    if steps is None:
        return 1.0
    try:
        value = float(steps)
    except (TypeError, ValueError) as e:
        raise Rejected(f"meta {NUM_STEPS}={steps!r}: float() refuses it ({e})") from e
    if not math.isfinite(value) or value < 0:
        raise Rejected(f"meta {NUM_STEPS}={steps!r} is negative or not finite (departure from NVFlare, "
                       f"which would weigh the contribution by it)")
    return value
