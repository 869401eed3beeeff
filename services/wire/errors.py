"""Error types of sagmq; library exceptions are translated into these at the boundary."""

from __future__ import annotations

# Exit codes of the sagmq processes, documented in the README.
EXIT_OK = 0
EXIT_FAILED = 1  # the job or command failed (reason printed)
EXIT_USAGE = 2  # bad arguments or bad input files
EXIT_BROKER = 3  # no broker answers, or it refused our credentials
EXIT_CONFIG = 4  # invalid settings


class SagmqError(Exception):
    """Root of every error sagmq raises on purpose."""


class UsageError(SagmqError):
    """A command's arguments are wrong (a job folder that does not exist, an impossible option)."""


class ConfigError(SagmqError):
    """A setting or an environment variable is invalid."""


class BrokerUnavailable(SagmqError):
    """No broker answered at the configured URL, or it refused the credentials.

    ``hint`` is the fix that fits the cause (start a broker, correct the password, create the
    vhost, check the certificates); the CLI prints it on the same line as the reason.
    """

    def __init__(self, url: str, reason: str, hint: str = "") -> None:
        super().__init__(f"cannot reach RabbitMQ at {url}: {reason}")
        self.url = url
        self.reason = reason
        self.hint = hint


class BrokerRefused(SagmqError):
    """The broker refused an operation (403 access refused, 406 precondition failed)."""


class DecodeError(SagmqError):
    """A message body or a property could not be decoded into a sagmq message."""


class Rejected(SagmqError):
    """A message is well-formed but not acceptable; it goes to the dead-letter queue."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JobSpecError(SagmqError):
    """A job folder is invalid; the message names the file and the field."""

    def __init__(self, file: str, field: str, problem: str) -> None:
        super().__init__(f"{file}: {field}: {problem}")
        self.file = file
        self.field = field
        self.problem = problem


class RpcTimeout(SagmqError):
    """An admin request got no reply in time."""
