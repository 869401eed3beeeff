"""ScatterAndGather's round rules as a pure state machine (events and time in, decisions out).

A round closes when every target answered, or when min_clients answered and
wait_time_after_min_received seconds passed since, or when train_timeout (if not 0)
passed since the round started, or when every target still owed an answer has stopped
heartbeating. Error results follow NVFlare's ignore_result_error: True ignores them,
False fails the job, None (dynamic) fails it only once the remaining good sites can no
longer reach min_clients.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from sagmq.job.spec import SAGConfig
from sagmq.wire.messages import RC_OK


@dataclass(slots=True)
class RoundMachine:
    """The state of one round on the server."""

    cfg: SAGConfig
    round: int
    targets: tuple[str, ...]
    started: float
    responded: dict[str, bool] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    min_reached_at: float | None = None

    def on_contribution(self, site: str, accepted: bool, rc: str, now: float) -> str | None:
        """Record a site's answer; return a reason if the job must fail because of it."""
        if site not in self.targets or site in self.responded:
            return None  # not ours, or a duplicate the aggregator already turned away
        self.responded[site] = accepted
        if self.min_reached_at is None and len(self.responded) >= self.cfg.min_clients:
            self.min_reached_at = now
        if rc == RC_OK:
            return None
        policy = self.cfg.ignore_result_error
        if policy is True:
            return None
        if policy is False:
            return f"result from {site} is bad (rc {rc}) and ignore_result_error is false; round {self.round}"
        self.failed.add(site)
        good = len(self.targets) - len(self.failed)
        if good < self.cfg.min_clients:
            return (
                f"cannot reach min_clients at round {self.round}: remaining good sites ({good}) "
                f"< min_clients ({self.cfg.min_clients}); failed: {', '.join(sorted(self.failed))}"
            )
        return None

    def close_reason(self, now: float, alive: Collection[str]) -> str | None:
        """Why the round should close now, or None to keep waiting."""
        if len(self.responded) == len(self.targets):
            return f"all {len(self.targets)} targets answered"
        if self.min_reached_at is not None and now - self.min_reached_at >= self.cfg.wait_time_after_min_received:
            return (
                f"{len(self.responded)} answered (min_clients {self.cfg.min_clients}) and "
                f"wait_time_after_min_received ({self.cfg.wait_time_after_min_received:g} s) passed"
            )
        if self.cfg.train_timeout > 0 and now - self.started >= self.cfg.train_timeout:
            return f"train_timeout ({self.cfg.train_timeout:g} s) reached with {len(self.responded)} answer(s)"
        outstanding = [t for t in self.targets if t not in self.responded]
        if outstanding and not any(t in alive for t in outstanding):
            return f"sites {', '.join(outstanding)} stopped answering"
        return None

    def all_answered(self) -> bool:
        """Every target answered (the aggregator then closes the round by itself)."""
        return len(self.responded) == len(self.targets)

    def accepted(self) -> list[str]:
        """Targets whose result was accepted."""
        return [s for s, ok in self.responded.items() if ok]


def should_persist(cfg: SAGConfig, rnd: int) -> bool:
    """NVFlare's rule: every n rounds ((r+1) % n == 0), and always the last round; n=0 means last only."""
    last = rnd == cfg.start_round + cfg.num_rounds - 1
    n = cfg.persist_every_n_rounds
    return last or (n > 0 and (rnd + 1) % n == 0)
