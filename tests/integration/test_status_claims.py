"""`sagmq status` beside sites that claim their names (SAGMQ_SITE=site-{n}): the claims are exclusive queues
of the sites' connections, which a passive declare may not touch (405 RESOURCE_LOCKED)."""

from __future__ import annotations

from typing import Any

import pika
import pytest

from sagmq.amqp.claim import SiteClaim
from sagmq.cli.admin import AdminClient
from sagmq.cli.status import queues_from_management, render, snapshot
from sagmq.wire.settings import Settings
from tests.conftest import wait_for

pytestmark = [pytest.mark.broker]


def test_status_shows_a_claimed_site_name_and_survives_a_locked_queue(settings: Settings) -> None:
    claim = SiteClaim(settings, "status-site", connect_timeout_s=5)
    other = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))  # holds an exclusive queue too
    admin = AdminClient(settings, 5.0)
    try:
        assert claim.claim("site-{n}") == "site-1"
        locked = f"{settings.prefix}.locked"
        other.channel().queue_declare(locked, exclusive=True)

        def listed() -> bool:
            rows, _ = queues_from_management(settings)
            names = {q["name"] for q in rows or []}
            return {f"{settings.prefix}.claim.site-1", locked, f"{settings.prefix}.server"} <= names
        # the management API lists a new queue once its statistics reach the management database: seconds
        # normally, but in a full CI run (thousands of queues made and deleted before) it once took over 20 s
        wait_for(listed, 90, "the management API to list the queues")

        snap = snapshot(settings, admin)
        queues: dict[str, dict[str, Any]] = {q["name"]: q for q in snap["queues"]}
        assert queues[f"{settings.prefix}.claim.site-1"].get("claim") is True
        assert locked in queues and not queues[locked].get("claim")  # as the management API has it
        # the queues after the locked one (in name order) still got their live figures on a fresh channel
        assert queues[f"{settings.prefix}.server"]["consumers"] == 0
        assert "and passive declares" in snap["queues_from"]
        assert f"{settings.prefix}.claim.site-1 (site name claim)" in render(snap)
        assert admin.queue_depth(f"{settings.prefix}.server") == (0, 0)  # the admin channel is still usable
    finally:
        admin.close()
        other.close()
        claim.close()
