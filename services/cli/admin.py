"""Admin requests over the broker (RPC with reply_to and correlation_id)."""

from __future__ import annotations

from typing import Any

from sagmq.amqp import AmqpBus
from sagmq.wire.errors import RpcTimeout, SagmqError
from sagmq.wire.messages import AdminReply, AdminRequest
from sagmq.wire.settings import Settings
from sagmq.wire.topology import RK_ADMIN_PERSISTOR, RK_ADMIN_SERVER, service_topology


class AdminClient:
    """Sends admin commands to the server (and download to the persistor)."""

    def __init__(self, settings: Settings, connect_timeout_s: float = 5.0) -> None:
        self.s = settings
        self.bus = AmqpBus(settings, "admin", connect_timeout_s=connect_timeout_s).connect()
        self.bus.declare(service_topology(settings.prefix))

    def close(self) -> None:
        """Close the connection."""
        self.bus.close()

    def call(self, command: str, args: dict[str, Any] | None = None, files: dict[str, bytes] | None = None,
             to: str = RK_ADMIN_SERVER, timeout_s: float | None = None) -> AdminReply:
        """Send one command and return the reply; raise SagmqError if it failed."""
        timeout = self.s.rpc_timeout_s if timeout_s is None else timeout_s
        req = AdminRequest(command, args or {}, files or {})
        try:
            d = self.bus.rpc(self.bus.names.admin, to, req, timeout)
        except RpcTimeout as e:
            who = "sagmq server" if to == RK_ADMIN_SERVER else "sagmq persistor"
            raise SagmqError(f"{e}: is `{who}` running with SAGMQ_PREFIX={self.s.prefix}?") from e
        reply = d.message(AdminReply, self.s.max_body_bytes)
        if not reply.ok:
            raise SagmqError(reply.error)
        return reply

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
