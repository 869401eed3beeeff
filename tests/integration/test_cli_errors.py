"""Each error case of the README's table: `sagmq` run as users run it, its one line and its exit code.

"No broker" is a closed port: the retry lines (one per try, none of tenacity's) and the final line
must come within 5 s. Invalid input fails at once, before any connection.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import JOBS, SAGMQ

EXIT_USAGE, EXIT_BROKER, EXIT_FAILED = 2, 3, 1


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sagmq(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, str, str, float]:
    """Exit code, stdout, stderr and seconds of one `sagmq` run in an environment without SAGMQ_* noise."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SAGMQ_")}
    t0 = time.monotonic()
    p = subprocess.run([SAGMQ, *args], env={**base, **(env or {})}, capture_output=True, text=True,
                       timeout=timeout, check=False)
    return p.returncode, p.stdout, p.stderr, time.monotonic() - t0


def error_line(stderr: str) -> str:
    """The one `error:` line (and there is exactly one)."""
    lines = [x for x in stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_no_broker_one_line_per_retry_then_the_reason_and_the_fix_within_5_s() -> None:
    port = closed_port()
    rc, out, err, took = sagmq("list", env={"SAGMQ_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{port}/%2F"})
    assert rc == EXIT_BROKER and took < 5.0, (took, err)
    assert "Retrying" not in err and "tenacity" not in err and "Traceback" not in err
    line = error_line(err)
    assert line == (f"error: cannot reach RabbitMQ at amqp://***@127.0.0.1:{port}/%2F: connection refused at "
                    f"127.0.0.1:{port}; is a RabbitMQ broker running at 127.0.0.1:{port}? Start one "
                    "(`rabbitmq-server -detached` or `docker compose up -d rabbitmq`) or point SAGMQ_AMQP_URL at yours")
    retries = [x for x in err.splitlines() if not x.startswith("error:")]
    assert retries and all(x.startswith(f"warning: connecting to RabbitMQ at amqp://***@127.0.0.1:{port}/%2F: "
                                        f"connection refused at 127.0.0.1:{port}; trying again in ") for x in retries)
    assert out == ""


def test_a_host_that_does_not_resolve_is_named_within_5_s() -> None:
    rc, _, err, took = sagmq("list", env={"SAGMQ_AMQP_URL": "amqp://guest:guest@no-such-host.invalid:5672/%2F"})
    assert rc == EXIT_BROKER and took < 5.0
    assert "cannot resolve the host of no-such-host.invalid:5672" in error_line(err) and "Traceback" not in err


def test_a_wrong_password_names_the_url_and_gives_no_advice_to_start_a_broker(amqp_url: str) -> None:
    rc, _, err, took = sagmq("list", env={"SAGMQ_AMQP_URL": amqp_url.replace("guest:guest", "guest:wrong")})
    assert rc == EXIT_BROKER and took < 5.0
    line = error_line(err)
    assert "refused the credentials of user 'guest' (403 ACCESS_REFUSED)" in line
    assert "check the user and password in SAGMQ_AMQP_URL" in line
    assert "rabbitmq-server" not in err and "docker compose" not in err and "warning:" not in err


def test_a_missing_vhost_is_named_with_how_to_create_it(amqp_url: str) -> None:
    url = amqp_url.rsplit("/", 1)[0] + "/no-such-vhost-h4"
    rc, _, err, took = sagmq("list", env={"SAGMQ_AMQP_URL": url})
    assert rc == EXIT_BROKER and took < 5.0
    line = error_line(err)
    assert "vhost 'no-such-vhost-h4' does not exist" in line and "rabbitmqctl add_vhost no-such-vhost-h4" in line


@pytest.mark.parametrize(("make", "problem"), [(lambda tmp: tmp / "nope", "does not exist"),
                                               (lambda tmp: tmp / "file.json", "is not a directory")])
def test_a_wrong_job_path_says_which_and_names_it(tmp_path: Path, make: object, problem: str) -> None:
    (tmp_path / "file.json").write_text("{}")
    path = make(tmp_path)  # type: ignore[operator]
    for args in (["submit", str(path)], ["poc", str(path)]):
        rc, _, err, took = sagmq(*args, env={"SAGMQ_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{closed_port()}/"})
        assert rc == EXIT_USAGE and took < 3.0, err  # at once: no connection was tried
        assert error_line(err) == f"error: job folder {path} {problem}"


def test_an_invalid_job_file_names_the_file_and_field_without_a_dash(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_text("not json")
    rc, _, err, _ = sagmq("submit", str(tmp_path))
    line = error_line(err)
    assert rc == EXIT_USAGE and line.startswith("error: invalid job: meta.json: not valid JSON") and " -:" not in line


def test_poc_refuses_at_once_a_job_needing_more_sites_than_clients() -> None:
    rc, out, err, took = sagmq("poc", str(JOBS / "hello-numpy-sag"), "--clients", "1",
                               env={"SAGMQ_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{closed_port()}/"})
    assert rc == EXIT_USAGE and took < 3.0 and out == ""
    assert error_line(err) == ("error: job hello-numpy-sag needs 2 site(s) (meta.json min_clients=2) but --clients 1 "
                               "gives it 1: run `sagmq poc --clients 2`")


def test_an_unknown_variable_is_named_with_the_closest_known_one() -> None:
    rc, _, err, _ = sagmq("submit", "/nonexistent-h4", env={"SAGMQ_AMQP_ULR": "amqp://x", "SAGMQ_QWERTY": "1"})
    assert rc == EXIT_USAGE
    assert "warning: unknown variable SAGMQ_AMQP_ULR is ignored (did you mean SAGMQ_AMQP_URL?)" in err.splitlines()
    assert "warning: unknown variable SAGMQ_QWERTY is ignored" in err.splitlines()


def test_an_invalid_setting_is_a_config_error() -> None:
    rc, _, err, _ = sagmq("list", env={"SAGMQ_HEARTBEAT_S": "often"})
    assert rc == 4 and error_line(err) == "error: SAGMQ_HEARTBEAT_S='often' is not a number"


def test_an_unknown_variable_is_named_before_an_invalid_setting() -> None:
    """The warning comes even when another setting stops the load: the typo may be its cause."""
    rc, _, err, _ = sagmq("list", env={"SAGMQ_HEARTBEAT_S": "often", "SAGMQ_AMQP_ULR": "amqp://x"})
    assert rc == 4
    assert err.splitlines() == ["warning: unknown variable SAGMQ_AMQP_ULR is ignored (did you mean SAGMQ_AMQP_URL?)",
                                "error: SAGMQ_HEARTBEAT_S='often' is not a number"], err


def test_version() -> None:
    from importlib.metadata import version

    rc, out, _, _ = sagmq("--version")
    assert rc == 0 and out.strip() == f"sagmq {version('sagmq')}"


def test_no_server_on_the_prefix_is_said_in_seconds_not_after_the_rpc_timeout(amqp_url: str, prefix: str) -> None:
    rc, _, err, took = sagmq("list", env={"SAGMQ_AMQP_URL": amqp_url, "SAGMQ_PREFIX": prefix})
    assert rc == EXIT_FAILED and took < 10.0, (took, err)
    assert error_line(err) == (f"error: nobody consumes {prefix}.server.admin: is `sagmq server` running with "
                               f"SAGMQ_PREFIX={prefix}? The request was not sent")
