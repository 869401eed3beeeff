"""A multi-site process speaks only for the sites its broker user is allowed (SAGMQ_SIMULATION_USERS)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from sagmq.aggregator.main import AggregatorService
from sagmq.client.multisite import MultiSite
from sagmq.memory import MemoryBroker, MemoryBus
from sagmq.server.main import ServerService
from sagmq.wire.codec import DXO, WEIGHTS
from sagmq.wire.messages import ClientHeartbeat, Contribution, RoundOpen, TaskResult
from sagmq.wire.settings import Settings
from sagmq.wire.topology import RK_RESULT, RK_ROUND_OPEN
from tests.unit.choreography.harness import LIMIT, Probe, running, service_bus

JOB = "b" * 32


def services(settings: Settings) -> Settings:
    """The services' settings: their own user 'server', and user 'sim' allowed sim-1 .. sim-3."""
    return replace(settings, amqp_url="amqp://server:x@localhost/%2F",
                   simulation_users=(("sim", ("sim-1..sim-3",)),))


def test_heartbeats_of_a_site_outside_the_set_are_dead_lettered(broker: MemoryBroker, settings: Settings) -> None:
    own = services(settings)
    probe = Probe(broker, own)
    sims = MemoryBus(broker, settings, "sims", user="sim").connect()
    with running(broker, lambda b: ServerService(own, b), service_bus(broker, own, "server")) as server, \
            running(broker, lambda b: MultiSite(settings, b, ["sim-1", "sim-2", "sim-3", "prod-1"], 2), sims):
        dead = probe.wait(lambda: next((d for d in probe.got if d.exchange == probe.names.dead
                                        and d.header_str("x-sagmq-original-type") == ClientHeartbeat.TYPE), None),
                          "a dead heartbeat")
        assert dead.header_str("x-sagmq-reason") == "spoofed sender: user 'sim' sent a heartbeat for site 'prod-1'"
        assert dead.header_str("x-sagmq-original-user") == "sim"
        probe.wait(lambda: {"sim-1", "sim-2", "sim-3"} <= set(server.sites), "the allowed sites to be seen")
        assert "prod-1" not in server.sites


def test_results_of_a_site_outside_the_set_are_dead_lettered(broker: MemoryBroker, settings: Settings) -> None:
    own = services(settings)
    probe = Probe(broker, own)
    sim = Probe(broker, settings, user="sim")
    w = np.ones(3, np.float32)
    with running(broker, lambda b: AggregatorService(own, b, grace_s=0.5), service_bus(broker, own, "aggregator")):
        m = RoundOpen(JOB, 0, "task-0", ["sim-1", "prod-1"], WEIGHTS, {"sim-1": 1.0, "prod-1": 1.0},
                      {"w": "<f4"}, {"w": [3]})
        probe.bus.publish(probe.names.events, RK_ROUND_OPEN, m, headers={"job_id": JOB, "round": 0})
        for site in ("prod-1", "sim-1"):
            r = TaskResult(JOB, 0, "train", "task-0", site, "OK", DXO(WEIGHTS, {"w": w}, {}))
            sim.bus.publish(sim.names.results, RK_RESULT, r, headers={"job_id": JOB, "round": 0, "site": site})
        dead = probe.dead()
        assert dead.header_str("x-sagmq-reason") == "spoofed sender: user 'sim' sent a result for site 'prod-1'"
        verdict = probe.first(Contribution, lambda c: c.site == "sim-1")
        assert verdict.accepted, verdict.reason
        assert [d for d in probe.got if d.msg_type == Contribution.TYPE
                and d.message(Contribution, LIMIT).site == "prod-1" and d.message(Contribution, LIMIT).accepted] == []
