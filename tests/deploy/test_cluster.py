"""deploy/cluster.yml: three RabbitMQ nodes, quorum queues; a node killed mid-job leaves the job exact."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.deploy.stack import CLUSTER_FILE, COMPOSE_FILE, Stack, docker, expected_model, make_job

ROUNDS = 10


@pytest.fixture
def cluster(images: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    s = Stack(images, tmp_path, files=[COMPOSE_FILE, CLUSTER_FILE], name="cluster")
    try:
        yield s
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(s.logs("server", "aggregator", "persistor", "client", "job")[-30000:])
            print(s.logs("rabbitmq", "rabbitmq-2", "rabbitmq-3")[-8000:])
        s.down()


def test_node_killed_mid_job_leaves_the_job_exact(cluster: Stack) -> None:
    cluster.env["SAGMQ_JOB"] = make_job(cluster.jobs, "slow", num_rounds=ROUNDS, sleep_time=1.5)
    cluster.compose("up", "-d", timeout=600)
    job, server = cluster.id("job"), cluster.id("server")
    node1, node2 = cluster.id("rabbitmq"), cluster.id("rabbitmq-2")

    cluster.wait_round(server, 1)
    docker("kill", node1)  # the node every service reached first (it is first in SAGMQ_AMQP_URL)
    code = cluster.wait_exit(job, timeout=300)
    assert code == 0, cluster.logs("job")[-6000:]
    np.testing.assert_array_equal(cluster.model(), expected_model(ROUNDS))
    assert [r["round"] for r in cluster.history()] == list(range(ROUNDS))

    # the two nodes left form the cluster, and every sagmq queue there is a quorum queue
    nodes = docker("exec", node2, "rabbitmqctl", "-q", "cluster_status", "--formatter", "json").stdout
    for name in ("rabbit@rabbitmq", "rabbit@rabbitmq-2", "rabbit@rabbitmq-3"):
        assert name in nodes, nodes
    queues = docker("exec", node2, "rabbitmqctl", "-q", "list_queues", "name", "type").stdout
    types = dict(line.split()[:2] for line in queues.splitlines() if line.startswith("sag."))
    assert types.get("sag.results") == "quorum", queues
    assert types.get("sag.site.site-1") == "quorum", queues
