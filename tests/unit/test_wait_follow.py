"""`sagmq wait` follows its job through a broker failover: no answer is asked again, a refusal is not."""

from __future__ import annotations

import io
import logging
from typing import Any

import pytest

from sagmq.cli import jobs
from sagmq.cli.admin import NoAnswer
from sagmq.wire.errors import BrokerUnavailable, SagmqError


class _Admin:
    """Answers status requests in turn: an exception is raised, a dict returned (the last one repeated)."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.asked = 0

    def status(self, job_id: str) -> dict[str, Any]:
        self.asked += 1
        a = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(a, BaseException):
            raise a
        return dict(a)


def _st(status: str, rounds: int) -> dict[str, Any]:
    return {"job_id": "j" * 32, "status": status, "history": [{"round": r, "accepted": ["site-1"]}
                                                              for r in range(rounds)]}


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs.time, "sleep", lambda _s: None)


def test_wait_asks_again_through_an_outage(caplog: pytest.LogCaptureFixture) -> None:
    lost = BrokerUnavailable("amqp://***@rabbitmq:5672/", "cannot resolve the host of rabbitmq:5672")
    admin = _Admin([_st("running", 1), NoAnswer("status: the connection to the broker was lost"), lost,
                    _st("running", 2), _st("finished", 3)])
    out = io.StringIO()
    with caplog.at_level(logging.WARNING, logger="sagmq.cli.jobs"):
        st = jobs.wait_job(admin, "j" * 32, 30, out)  # type: ignore[arg-type]
    assert st["status"] == "finished" and admin.asked == 5
    assert [line.split(":")[0] for line in out.getvalue().splitlines() if line.startswith("round")] == \
        ["round 0", "round 1", "round 2"]  # each round told once, across the outage
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "no answer" in said[0] and "answered again" in said[1], said


def test_wait_gives_up_after_a_long_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "FOLLOW_OUTAGE_S", 0.0)
    admin = _Admin([_st("running", 1), NoAnswer("no reply to status 'server' within 30 s")])
    with pytest.raises(NoAnswer, match="no reply"):
        jobs.wait_job(admin, "j" * 32, 30, io.StringIO())  # type: ignore[arg-type]


def test_wait_does_not_retry_a_refusal() -> None:
    admin = _Admin([SagmqError("no job jjjj"), _st("finished", 1)])
    with pytest.raises(SagmqError, match="no job"):
        jobs.wait_job(admin, "j" * 32, 30, io.StringIO())  # type: ignore[arg-type]
    assert admin.asked == 1
