"""deploy/multihost/: a server-side project and two site projects that share only the broker's network, over TLS."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.deploy.stack import MULTIHOST, ROOT, Stack, expected_model

BROKER_HOST = "broker.sagmq.test"


def _provision(out: Path) -> None:
    subprocess.run([sys.executable, "-m", "sagmq.cli.main", "provision", "--tls", "--out", str(out),
                    "--sites", "site-1,site-2", "--host", BROKER_HOST], check=True, capture_output=True, cwd=ROOT)
    # The containers' users (rabbitmq, sagmq uid 10001) are not the test's user. In a test, world-readable
    # copies are fine; deploy/README.md says how to hand each key to its container's user instead.
    for path in [out, *out.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def _site_tls(prov: Path, site: str, dest: Path) -> Path:
    """What the operator sends a site: the CA and the site's own certificate and key, nothing else."""
    dest.mkdir()
    for name in ("ca.pem", f"{site}.pem", f"{site}.key"):
        shutil.copy2(prov / "tls" / name, dest / name)
    return dest


def test_two_projects_over_tls_sharing_only_the_broker_network(images: Path, tmp_path: Path) -> None:
    prov = tmp_path / "provision"
    _provision(prov)
    server = Stack(images, tmp_path / "server", files=[MULTIHOST / "server.yml"], name="mhserver")
    network = f"{server.project}-broker"
    server.env.update(SAGMQ_PROVISION_DIR=str(prov), SAGMQ_BROKER_NETWORK=network, SAGMQ_BROKER_BIND="127.0.0.1",
                      SAGMQ_AMQPS_PORT="", SAGMQ_BROKER_HOST=BROKER_HOST)
    sites = []
    for site in ("site-1", "site-2"):
        s = Stack(images, tmp_path / site, files=[MULTIHOST / "site.yml", Path(__file__).parent /
                                                  "site-on-broker-network.yml"], name=f"mh{site.replace('-', '')}")
        s.env.update(SAGMQ_SITE_ENV=str(prov / "sites" / f"{site}.env"), SAGMQ_BROKER_NETWORK=network,
                     SAGMQ_TLS_DIR=str(_site_tls(prov, site, tmp_path / f"{site}-tls")))
        sites.append(s)
    try:
        server.compose("up", "-d", timeout=300)
        for s in sites:
            s.compose("up", "-d", timeout=300)
        for s in sites:
            s.wait_healthy(["client"], timeout=120)
        job = server.compose("run", "--rm", "job", timeout=300, check=False)
        assert job.returncode == 0, job.stdout[-6000:] + job.stderr[-3000:] + server.logs()[-10000:] + \
            "".join(s.logs()[-4000:] for s in sites)
        np.testing.assert_array_equal(server.model(), expected_model(3))
        assert sorted(server.history()[-1]["accepted"]) == ["site-1", "site-2"]
        # a site container is on the broker network only: the one thing the projects share
        for s in sites:
            nets = s.inspect(s.id("client"), "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}")
            assert set(nets.split()) == {network}, nets
    finally:
        for s in sites:
            s.down()
        server.down()
