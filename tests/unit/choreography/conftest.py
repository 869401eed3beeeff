"""Fixtures of the choreography tests: a fresh MemoryBroker and short settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagmq.memory import MemoryBroker
from sagmq.wire.settings import Settings


@pytest.fixture
def broker() -> MemoryBroker:
    """A broker of this test's own (declared by the services and probes as they start)."""
    return MemoryBroker()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Short timings, so the rules that wait (heartbeats, silent sites) act within a test."""
    return Settings(prefix="t", workspace=tmp_path / "ws", heartbeat_s=0.1, client_timeout_s=3.0,
                    schedule_timeout_s=10.0, chunk_timeout_s=5.0, rpc_timeout_s=5.0)
