"""Admin requests over the broker (RPC with reply_to and correlation_id).

A request carries the CLI's timeout as its expiration: one nobody answered in time is waited for
by nobody. The server's admin queue drops it when it expires. The persistor's queue (which takes
download requests beside its work) dead-letters what expires, so a download is sent only once a
persistor consumes that queue: an outage then adds nothing to the dead-letter queue.
"""

from __future__ import annotations

import time
from typing import Any

from sagmq.amqp import AmqpBus
from sagmq.amqp.rpc import RequestLost, RequestNotTaken
from sagmq.wire.errors import RpcTimeout, SagmqError
from sagmq.wire.messages import AdminReply, AdminRequest
from sagmq.wire.settings import Settings
from sagmq.wire.topology import RK_ADMIN_PERSISTOR, RK_ADMIN_SERVER, service_topology

NOT_FOUND = 404
# Commands that only read: sent again when the connection is lost while they wait for their reply.
READ_ONLY = frozenset({"status", "list", "download"})


class NoAnswer(SagmqError):
    """A request got no answer: nobody consumes its queue, no reply came in time, or the connection to the
    broker was lost while it waited (a command that changes something is then not sent again). Worth another
    try later, unlike a reply that says the command failed."""


CLI_CONNECT_S = 2.5  # a command fails within 5 s when no broker answers (the process's own start included)


class AdminClient:
    """Sends admin commands to the server (and download to the persistor)."""

    def __init__(self, settings: Settings, connect_timeout_s: float = 5.0, server_grace_s: float | None = None) -> None:
        """server_grace_s: fail a request to the server after this long without a consumer of its admin queue
        (the CLI's 5 s: a server that restarts is back by then), instead of waiting for a reply that cannot come."""
        self.s = settings
        self.server_grace_s = server_grace_s
        self.bus = AmqpBus(settings, "admin", connect_timeout_s=connect_timeout_s).connect()
        self.bus.declare(service_topology(settings.prefix, settings))

    def close(self) -> None:
        """Close the connection."""
        self.bus.close()

    def call(self, command: str, args: dict[str, Any] | None = None, files: dict[str, bytes] | None = None,
             to: str = RK_ADMIN_SERVER, timeout_s: float | None = None) -> AdminReply:
        """Send one command and return the reply; raise SagmqError if it failed."""
        timeout = self.s.rpc_timeout_s if timeout_s is None else timeout_s
        req = AdminRequest(command, args or {}, files or {})
        deadline = time.monotonic() + timeout
        if to == RK_ADMIN_PERSISTOR:
            self._wait_for_consumer(self.bus.names.persistor_queue, "sagmq persistor", deadline)
        elif self.server_grace_s is not None:
            self._wait_for_consumer(self.bus.names.server_admin_queue, "sagmq server",
                                    min(deadline, time.monotonic() + self.server_grace_s))
        try:
            d = self.bus.rpc(self.bus.names.admin, to, req, max(0.1, deadline - time.monotonic()),
                             resend=command in READ_ONLY)
        except RpcTimeout as e:
            who = "sagmq server" if to == RK_ADMIN_SERVER else "sagmq persistor"
            raise NoAnswer(f"{e}: is `{who}` running with SAGMQ_PREFIX={self.s.prefix}?") from e
        except (RequestLost, RequestNotTaken) as e:
            raise NoAnswer(f"{command}: {e}" + ("" if command in READ_ONLY else "; `sagmq status` tells")) from e
        reply = d.message(AdminReply, self.s.max_body_bytes)
        if not reply.ok:
            raise SagmqError(reply.error)
        return reply

    def consumers(self, queue: str) -> int:
        """How many consumers a queue has (0 if it does not exist), from a passive declare."""
        try:
            return int(self.bus.on_admin_channel(lambda ch: ch.queue_declare(queue, passive=True)).method.consumer_count)
        except Exception as e:  # pika's ChannelClosedByBroker; only the bus may import pika
            if getattr(e, "reply_code", None) == NOT_FOUND:
                return 0
            raise

    def queue_depth(self, queue: str) -> tuple[int, int] | None:
        """Messages and consumers of a queue (a passive declare), or None if it does not exist."""
        try:
            m = self.bus.on_admin_channel(lambda ch: ch.queue_declare(queue, passive=True)).method
        except Exception as e:  # pika's ChannelClosedByBroker; only the bus may import pika
            if getattr(e, "reply_code", None) == NOT_FOUND:
                return None
            raise
        return int(m.message_count), int(m.consumer_count)

    def _wait_for_consumer(self, queue: str, who: str, deadline: float) -> None:
        """Wait until deadline for a consumer of queue (a service restarting), else fail without sending."""
        while self.consumers(queue) == 0:
            if time.monotonic() >= deadline:
                raise NoAnswer(f"nobody consumes {queue}: is `{who}` running with SAGMQ_PREFIX={self.s.prefix}? "
                                 f"The request was not sent")
            time.sleep(0.2)

    def submit(self, files: dict[str, bytes]) -> str:
        """Submit a job folder's files; the new job's id."""
        return str(self.call("submit", files=files).result["job_id"])

    def status(self, job_id: str | None = None, history_from: int = 0) -> dict[str, Any]:
        """The sites and jobs, or one job with its round records (from index history_from on)."""
        args: dict[str, Any] = {"job_id": job_id} if job_id else {}
        if job_id and history_from:
            args["history_from"] = history_from
        return self.call("status", args).result

    def download(self, job_id: str) -> dict[str, bytes]:
        """Every file the persistor holds for the job (a unique id prefix is resolved by the server)."""
        full = str(self.status(job_id)["job_id"])
        return self.call("download", {"job_id": full}, to=RK_ADMIN_PERSISTOR).files
