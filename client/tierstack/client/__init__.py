"""The typed async client SDK for tierstack's three tiers and their monitors."""

from tierstack.client.clients import CoordinatorClient, ExecutorClient, MonitorClient, OrchestratorClient
from tierstack.client.errors import (
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    TierstackError,
    UnavailableError,
)

__all__ = [
    "AlreadyExistsError",
    "CancelledError",
    "CoordinatorClient",
    "DeadlineExceededError",
    "ExecutorClient",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "MonitorClient",
    "NotFoundError",
    "OrchestratorClient",
    "ResourceExhaustedError",
    "TierstackError",
    "UnavailableError",
]
