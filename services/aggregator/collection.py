"""InTimeAccumulateWeightedAggregator in NVFlare's collection mode: one weighted average per key.

When a job's ``expected_data_kind`` is a dict ``{key: WEIGHTS | WEIGHT_DIFF | METRICS}``,
each result is a DXO of kind COLLECTION whose data is ``{key: sub-DXO}``. Every key has an
accumulator of its own (sagmq's InTimeAccumulateWeightedAggregator, NVFlare's DXOAggregator)
with its own kind, ``aggregation_weights`` and ``exclude_vars``; a value given once applies to
every key, a dict of them gives one per key. ``weigh_by_local_iter`` is one flag for all keys,
and a sub-DXO's weight comes from its own meta NUM_STEPS_CURRENT_ROUND, as in NVFlare. The
aggregate is a COLLECTION of the per-key aggregates. The arguments are checked and resolved per
key by sagmq.job.collection_spec (at submit, by NVFlare's rules).

As NVFlare: a key the result lacks is skipped (the other keys count it), keys that were not
expected are ignored, and a result that carries none of the expected keys is refused. Unlike
NVFlare, a result is checked under every key before any of it is added, so a refused
sub-DXO leaves no part of the result in the sums (NVFlare may have added the keys before it).
A collection is never streamed in parts: one larger than SAGMQ_CHUNK_BYTES is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from sagmq.aggregator.intime_accumulate_weighted_aggregator import (
    InTimeAccumulateWeightedAggregator,
    StreamHeader,
    StreamStatus,
    VarSpec,
)
from sagmq.job.collection_spec import KeySettings
from sagmq.wire.codec import COLLECTION, DXO, METRICS, collection
from sagmq.wire.errors import Rejected


class CollectionAggregator(InTimeAccumulateWeightedAggregator):
    """One round's aggregation of COLLECTION results: an accumulator per key. It offers the host the same
    calls as the single-kind aggregator; it never has a stream open (a collection is not taken in parts)."""

    def __init__(
        self,
        keys: Mapping[str, KeySettings],
        weigh_by_local_iter: bool = True,
        *,
        targets: Iterable[str] = (),
        spec: Mapping[str, VarSpec] | None = None,
    ) -> None:
        super().__init__(COLLECTION, None, None, weigh_by_local_iter, targets=targets)
        # METRICS are not model variables: the model's spec (dtype, shape) holds for the other kinds only
        self.keys: dict[str, InTimeAccumulateWeightedAggregator] = {
            k: InTimeAccumulateWeightedAggregator(s.kind, s.aggregation_weights, s.exclude_vars, weigh_by_local_iter,
                                                  targets=self.targets, spec=None if s.kind == METRICS else spec)
            for k, s in keys.items()}

    def accept(self, site: str, rc: str, dxo: DXO | None, error: str = "") -> None:
        """Check every expected sub-DXO, then add them all; or raise Rejected naming the key at fault."""
        self._check_sender(site, rc, error)
        if dxo is None:
            raise Rejected(f"site {site} sent no DXO")
        if dxo.kind != COLLECTION:
            raise Rejected(f"expected a COLLECTION with keys {list(self.keys)} but got a DXO of kind {dxo.kind}")
        if site in self.accepted:
            raise Rejected(f"duplicate: a contribution from site {site} was already accepted this round")
        checked = []
        for key, acc in self.keys.items():
            sub = dxo.subs.get(key)
            if sub is None:
                continue
            try:
                weight, names = acc.check_whole(site, rc, sub, error)
            except Rejected as e:
                raise Rejected(f"sub-DXO {key!r}: {e.reason}") from e
            checked.append((acc, sub, weight, names))
        if not checked:
            raise Rejected(f"the COLLECTION carries none of the expected keys {list(self.keys)} "
                           f"(it has {sorted(dxo.subs)})")
        for acc, sub, weight, names in checked:
            acc.add_whole(site, sub, weight, names)
        missing = [k for k in self.keys if k not in dxo.subs]
        if missing:
            self.notes.append(f"site {site}'s COLLECTION lacks key(s) {missing}: they are aggregated without it "
                              f"(as NVFlare does)")
        self.accepted.append(site)

    def begin_stream(self, blob: str, site: str, rc: str, header: StreamHeader, error: str = "") -> StreamStatus:
        """A result in parts is refused: sagmq does not stream a COLLECTION (README, "Departures from NVFlare")."""
        self._check_sender(site, rc, error)
        if header.kind != COLLECTION:
            raise Rejected(f"expected a COLLECTION with keys {list(self.keys)} but got a DXO of kind {header.kind}")
        raise Rejected(f"a COLLECTION result of {header.size} bytes came in parts (larger than SAGMQ_CHUNK_BYTES); "
                       f"sagmq does not stream collections: raise SAGMQ_CHUNK_BYTES above its size (below the "
                       f"broker's max_message_size) or send smaller sub-DXOs")

    def aggregate(self) -> DXO | None:
        """A COLLECTION of each key's weighted average (None if nothing was accepted); a key no site sent is an
        empty DXO of its kind, as NVFlare's."""
        if not self.accepted:
            return None
        subs: dict[str, DXO] = {}
        for key, acc in self.keys.items():
            sub = acc.aggregate()
            subs[key] = sub if sub is not None else DXO(acc.expected_data_kind, {}, {"accepted": []})
            self.notes.extend(f"key {key!r}: {note}" for note in acc.notes)
        return collection(subs, {"accepted": list(self.accepted)})
