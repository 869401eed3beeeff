"""A private, throw-away RabbitMQ node for tests that restart the broker, change its settings or use TLS.

The machine's shared broker (rabbit@localhost on 5672) is never touched. A RabbitNode has
its own node name (sagmqtest-<8 hex>@localhost), its own ports (AMQP, optional AMQPS, Erlang
distribution), its own directory (data, logs, pid file, rabbitmq.conf, enabled_plugins),
its own Erlang cookie (in a private HOME, so a typo in -n can never reach the shared node),
and its own empty rabbitmq-env.conf: /etc/rabbitmq/rabbitmq-env.conf sets NODENAME and
ERL_FLAGS and would otherwise be sourced by the scripts *and* re-read by the node itself.
Only epmd is shared: the node registers its name with the epmd already on 127.0.0.1:4369
(if none runs, Erlang starts one, which then outlives the node, as epmd always does).

    with running_node(config=["consumer_timeout = 60000"]) as node:
        AmqpBus(Settings(amqp_url=node.url), "t").connect()
        node.restart()            # same data dir: durable queues and persistent messages survive
        node.ctl("list_queues")   # rabbitmqctl against this node only

TLS: `make_certs(dir)` writes a CA, a server and a client certificate with the openssl CLI;
`RabbitNode(tls=certs)` adds an AMQPS listener (on 127.0.0.1) that requires a client certificate.

Start-up takes 6-8 s (mostly CPU: the Erlang VM loading and JIT-compiling RabbitMQ's ~950
modules); to keep it down the node gets a plugins directory that holds only rabbit and its
libraries (fewer Cuttlefish schemas to parse, nothing to discover), and readiness is awaited
with `rabbitmqctl wait <pid file>` started alongside the server (it returns once the rabbit
app runs) instead of a sequential `await_startup` that boots a second CLI VM after the node
is up; then an AMQP protocol-header exchange proves the node itself answers on its port.

Cleanup: running_node() stops the node in `finally`; an atexit hook stops any node still
running; and the server runs under `setpriv --pdeathsig TERM`, so if the test process is
SIGKILLed the wrapper shell gets SIGTERM and shuts RabbitMQ down. (PDEATHSIG fires when
the *thread* that started the node exits: start nodes from the main thread or a fixture.)
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

RABBIT_BIN = Path(os.environ.get("SAGMQ_TEST_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
# The package's plugins directory: rabbit itself and all its libraries live there too.
SYSTEM_PLUGINS = Path(os.path.realpath(RABBIT_BIN / "rabbitmq-server")).parent.parent / "plugins"
OPENSSL = shutil.which("openssl")
SETPRIV = shutil.which("setpriv")

_live: set[RabbitNode] = set()
_live_lock = threading.Lock()


class NodeError(RuntimeError):
    """The private node did not start or stop as asked (the message carries its log tail)."""


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports that were free on 127.0.0.1 a moment ago (bound to port 0, then released)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _clean_env() -> dict[str, str]:
    """The caller's environment without anything that would steer a RabbitMQ node or the Erlang VM."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k not in ("NOTIFY_SOCKET", "CONF_ENV_FILE")}


def _pids_of(marker: str) -> list[int]:
    """Processes whose command line contains marker (our node's directory: nobody else's can)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(d.name))
    return pids


class RabbitNode:
    """One private RabbitMQ node: start(), restart(), kill(), stop(), url, amqps_url, ctl()."""

    def __init__(
        self,
        config: Iterable[str] = (),
        tls: dict[str, Path] | None = None,
        base_dir: Path | str | None = None,
        plugins: Iterable[str] = (),
        start_timeout_s: float = 90.0,
    ) -> None:
        """config: extra rabbitmq.conf lines; tls: make_certs() output; plugins: to enable (slower start)."""
        self.id = secrets.token_hex(4)
        self.host = "localhost"
        self.name = f"sagmqtest-{self.id}@{self.host}"
        self.extra_config = list(config)
        self.tls = tls
        self.plugins = list(plugins)
        self.start_timeout_s = start_timeout_s
        # everything of the node lives in dir (created by start(), removed by stop())
        self.dir = Path(base_dir if base_dir is not None else tempfile.gettempdir()) / f"sagmqtest-{self.id}"
        self.home = self.dir / "home"  # the node's and its rabbitmqctl's own .erlang.cookie
        self.mnesia_base = self.dir / "mnesia"
        self.log_dir = self.dir / "log"
        self.plugins_dir = self.dir / "plugins"
        self.pid_file = self.dir / "node.pid"
        self.conf_file = self.dir / "rabbitmq.conf"
        self.plugins_file = self.dir / "enabled_plugins"
        self.env_file = self.dir / "rabbitmq-env.conf"  # empty: neutralises /etc/rabbitmq/rabbitmq-env.conf
        self.stdout_file = self.dir / "stdout.log"
        self.port = self.dist_port = 0
        self.tls_port: int | None = None
        self._pick_ports()
        self.cookie = secrets.token_hex(16).upper()
        self.start_times: list[float] = []  # seconds, one per start()
        self.stop_times: list[float] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._files_written = False

    # --- addresses ------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def amqps_url(self) -> str:
        """amqps://…@localhost:PORT (the server certificate names localhost and 127.0.0.1)."""
        if self.tls_port is None:
            raise NodeError("this node was created without tls=make_certs(...)")
        return f"amqps://guest:guest@localhost:{self.tls_port}/%2F"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # --- files and environment ------------------------------------------------------

    def config_lines(self) -> list[str]:
        lines = [
            f"listeners.tcp.default = 127.0.0.1:{self.port}",
            "log.file.level = info",
            "log.console = false",
        ]
        if self.tls is not None:
            c = self.tls
            lines += [
                f"listeners.ssl.default = 127.0.0.1:{self.tls_port}",
                f"ssl_options.cacertfile = {c['ca_cert']}",
                f"ssl_options.certfile = {c['server_cert']}",
                f"ssl_options.keyfile = {c['server_key']}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = true",
            ]
        return lines + self.extra_config

    def _write_files(self) -> None:
        if self._files_written:
            return
        self.dir.mkdir(parents=True)  # a fresh one: fails rather than share a directory
        for d in (self.home, self.mnesia_base, self.log_dir):
            d.mkdir()
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(self.cookie)
        cookie.chmod(0o400)
        self.conf_file.write_text("\n".join(self.config_lines()) + "\n")
        self.plugins_file.write_text(f"[{','.join(self.plugins)}].\n")
        self.env_file.write_text("")
        if not self.plugins:
            # rabbit and its libraries only: no plugin's Cuttlefish schema to parse, nothing to discover
            self.plugins_dir.mkdir(exist_ok=True)
            for app in SYSTEM_PLUGINS.iterdir():
                if not app.name.startswith("rabbitmq_") or app.name.startswith("rabbitmq_prelaunch-"):
                    (self.plugins_dir / app.name).symlink_to(app)
        self._files_written = True

    def env(self) -> dict[str, str]:
        """The complete environment of this node's rabbitmq-server and rabbitmqctl."""
        return {
            **_clean_env(),
            "HOME": str(self.home),
            "RABBITMQ_CONF_ENV_FILE": str(self.env_file),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.conf_file),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),  # absent on purpose
            "RABBITMQ_CONFIG_FILES": str(self.dir / "conf.d"),  # absent on purpose
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.plugins_file),
            "RABBITMQ_PLUGINS_DIR": str(self.plugins_dir if not self.plugins else SYSTEM_PLUGINS),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(self.dir / "plugins-expand"),
            "RABBITMQ_MNESIA_BASE": str(self.mnesia_base),
            "RABBITMQ_MNESIA_DIR": str(self.mnesia_base / self.name),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            # what /etc/rabbitmq/rabbitmq-env.conf did for the shared node: distribution on loopback only
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            # rabbitmqctl's own distribution port: any free one, not the shared 35672-35682 range
            "RABBITMQ_CTL_DIST_PORT_MIN": "0",
            "RABBITMQ_CTL_DIST_PORT_MAX": "0",
        }

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for f in [self.stdout_file, *sorted(self.log_dir.glob("*.log"))]:
            try:
                text = f.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(out)

    # --- lifecycle ------------------------------------------------------------------

    def _ctl_cmd(self, *args: str) -> list[str]:
        return [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.name, *args]

    def start(self) -> RabbitNode:
        """Boot the node and wait until RabbitMQ is running and its ports accept connections.

        Raises NodeError (with the node's log tail) if it exits or takes longer than start_timeout_s.
        On its first start, a port taken by someone else in the meantime means new ports and one retry.
        """
        if self.running:
            return self
        try:
            return self._start_once()
        except NodeError:
            if self.start_times or not self._port_clash():
                raise
            self._pick_ports()
            self.conf_file.write_text("\n".join(self.config_lines()) + "\n")
            return self._start_once()

    def _port_clash(self) -> bool:
        text = ""
        for f in [self.stdout_file, *self.log_dir.glob("*.log")]:
            with contextlib.suppress(OSError):
                text += f.read_text(errors="replace")
        return "eaddrinuse" in text or "could_not_start_listener" in text or "in use" in text

    def _pick_ports(self) -> None:
        ports = free_ports(3 if self.tls else 2)
        self.port, self.dist_port = ports[0], ports[1]
        self.tls_port = ports[2] if self.tls else None

    def _start_once(self) -> RabbitNode:
        self._write_files()
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()  # a stale one would send `rabbitmqctl wait` after a dead pid
        t0 = time.monotonic()
        cmd = [str(RABBIT_BIN / "rabbitmq-server")]
        if SETPRIV:  # if the test process (the starting thread) dies, the wrapper shell gets SIGTERM
            cmd = [SETPRIV, "--pdeathsig", "TERM", *cmd]  # and stops the node
        env = self.env()
        with open(self.stdout_file, "ab") as out:
            self._proc = subprocess.Popen(cmd, env=env, cwd=self.dir, stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        with _live_lock:
            _live.add(self)
        # `rabbitmqctl wait PIDFILE` (made for -detached starts) runs alongside the boot and returns
        # once the rabbit app runs: ~1-2 s sooner than a sequential `await_startup` after the fact
        with open(self.dir / "wait.log", "w+") as wait_log:
            waiter = subprocess.Popen(
                self._ctl_cmd("wait", str(self.pid_file), "--timeout", str(int(self.start_timeout_s))),
                env=env, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=wait_log, stderr=subprocess.STDOUT)
            deadline = t0 + self.start_timeout_s
            ports = [self.port] + ([self.tls_port] if self.tls_port else [])
            try:
                while True:
                    if self._proc.poll() is not None:
                        raise NodeError(f"{self.name} exited with {self._proc.returncode} while starting")
                    rc = waiter.poll()
                    if rc not in (None, 0):
                        wait_log.seek(0)
                        raise NodeError(f"rabbitmqctl wait failed ({rc}): {wait_log.read()}")
                    # a port-open check alone could be fooled by whoever took our port in the meantime
                    if rc == 0 and self._answers_amqp() and all(_port_open(p) for p in ports[1:]):
                        break
                    if time.monotonic() > deadline:
                        raise NodeError(f"{self.name} did not start in {self.start_timeout_s} s")
                    time.sleep(0.05)
            except NodeError as e:
                tail = self.log_tail()
                self._halt(graceful=False)
                raise NodeError(f"{e}\n{tail}") from e
            finally:
                if waiter.poll() is None:
                    waiter.kill()
                waiter.wait()
        self.start_times.append(time.monotonic() - t0)
        return self

    def _answers_amqp(self) -> bool:
        """Does an AMQP 0-9-1 server answer on our port (Connection.Start to the protocol header)?

        Whatever the users are (load_definitions may have removed guest), and not fooled by a
        stranger that took the port after we picked it.
        """
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(b"AMQP\x00\x00\x09\x01")
                head = s.recv(11)
        except OSError:
            return False
        # method frame on channel 0, class 10 (connection) method 10 (start)
        return len(head) == 11 and head[:3] == b"\x01\x00\x00" and head[7:11] == b"\x00\x0a\x00\x0a"

    def pids(self) -> list[int]:
        """Every live process of this node (the wrapper shell, the VM and its helpers, its rabbitmqctl runs)."""
        pids = _pids_of(f"{self.dir}/")
        if self._proc is not None and self._proc.poll() is None and self._proc.pid not in pids:
            pids.append(self._proc.pid)
        return pids

    def beam_pid(self) -> int | None:
        """The OS pid of the node's Erlang VM (from its pid file), if it runs."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid in self.pids() else None

    def _halt(self, graceful: bool = True, timeout_s: float = 60.0) -> None:
        """Stop the node's processes (rabbitmqctl stop, else SIGTERM, else SIGKILL), keeping its files."""
        proc = self._proc
        if proc is None:
            return
        t0 = time.monotonic()
        if graceful and proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):  # waits for the VM to exit
                self.ctl("stop", str(self.pid_file), check=False, timeout=timeout_s)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            if proc.poll() is None:  # the wrapper shell forwards SIGTERM to the VM (a clean stop) and waits
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=20)
        # whatever is left of this node (the VM, erl_child_setup, inet_gethost, the wrapper): SIGKILL
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        self._proc = None
        with _live_lock:
            _live.discard(self)
        self.stop_times.append(time.monotonic() - t0)

    def kill(self) -> None:
        """Crash the node (SIGKILL, no shutdown); start() brings it back on the same data."""
        self._halt(graceful=False)

    def restart(self) -> RabbitNode:
        """Stop gracefully and start again on the same data directory, ports and name."""
        self._halt()
        return self.start()

    def stop(self, cleanup: bool = True) -> None:
        """Stop the node (rabbitmqctl stop, then make sure its processes are gone); remove its files."""
        try:
            self._halt()
        finally:
            if cleanup:
                shutil.rmtree(self.dir, ignore_errors=True)

    # --- rabbitmqctl ----------------------------------------------------------------

    def ctl(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run `rabbitmqctl -n THIS_NODE -q ARGS` with this node's cookie; raise NodeError if it fails."""
        r = subprocess.run(self._ctl_cmd("-q", *args), env=self.env(), cwd=self.dir, capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise NodeError(f"rabbitmqctl {' '.join(args)} on {self.name} failed ({r.returncode}): "
                            f"{r.stdout}{r.stderr}")
        return r

    def eval(self, expr: str) -> str:
        """Evaluate an Erlang expression on the node; what it prints."""
        return self.ctl("eval", expr).stdout.strip()

    def shell_hint(self) -> str:
        """A command line to inspect the node by hand while a test is paused."""
        return f"HOME={self.home} RABBITMQ_CONF_ENV_FILE={self.env_file} {RABBIT_BIN}/rabbitmqctl -n {self.name} status"

    def __repr__(self) -> str:
        return f"RabbitNode({self.name}, amqp={self.port}, amqps={self.tls_port}, dir={self.dir})"


@contextlib.contextmanager
def running_node(config: Iterable[str] = (), tls: dict[str, Path] | None = None,
                 base_dir: Path | str | None = None, plugins: Iterable[str] = ()) -> Iterator[RabbitNode]:
    """A started RabbitNode, stopped and removed afterwards whatever happens (use it in fixtures)."""
    node = RabbitNode(config=config, tls=tls, base_dir=base_dir, plugins=plugins)
    try:
        yield node.start()
    finally:
        node.stop()


@atexit.register
def _stop_leftovers() -> None:
    with _live_lock:
        nodes = list(_live)
    for node in nodes:
        with contextlib.suppress(Exception):
            node.stop()


# --- TLS ----------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    if OPENSSL is None:
        raise NodeError("the openssl command is not installed; the TLS tests need it to make certificates")
    r = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "OPENSSL_CONF": str(cwd / "req.cnf")})
    if r.returncode != 0:
        raise NodeError(f"openssl {' '.join(args)} failed: {r.stderr}")


def make_certs(dir: Path | str) -> dict[str, Path]:
    """A CA, a server certificate (CN=localhost, SAN DNS:localhost, IP:127.0.0.1) and a client one.

    EC P-256 keys (fast to make), unencrypted, valid for 2 days; PEM files in dir. Returns their
    paths: ca_cert, ca_key, server_cert, server_key, client_cert, client_key (and dir).
    """
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    # a minimal config, so that the system's openssl.cnf cannot change the result
    (d / "req.cnf").write_text(
        "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\n"
        "[v3_ca]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n"
        "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid:always\n"
    )
    leaf = (
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid, issuer\n"
    )
    (d / "server.ext").write_text(leaf + "extendedKeyUsage = serverAuth\n"
                                  "subjectAltName = DNS:localhost, IP:127.0.0.1\n")
    (d / "client.ext").write_text(leaf + "extendedKeyUsage = clientAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=sagmq test CA", "-extensions", "v3_ca", "-config", "req.cnf", cwd=d)
    for who, cn in (("server", "localhost"), ("client", "sagmq-test-client")):
        _openssl("req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN={cn}",
                 "-config", "req.cnf", cwd=d)
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-out", f"{who}.pem", "-extfile", f"{who}.ext", cwd=d)
    return {
        "dir": d,
        "ca_cert": d / "ca.pem",
        "ca_key": d / "ca.key",
        "server_cert": d / "server.pem",
        "server_key": d / "server.key",
        "client_cert": d / "client.pem",
        "client_key": d / "client.key",
    }
