"""The typed async client SDK for tierstack's three tiers and their monitors; a failed call raises an
error of the one tree in :mod:`tierstack.core.errors`, re-exported here."""

from tierstack.client.clients import CoordinatorClient, ExecutorClient, MonitorClient, OrchestratorClient
from tierstack.client.tls import Tls
from tierstack.core.errors import (
    AlreadyExistsError,
    CallCancelledError,
    Code,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TierstackError,
    UnauthenticatedError,
    UnavailableError,
    Violation,
)

__all__ = [
    "AlreadyExistsError",
    "CallCancelledError",
    "Code",
    "CoordinatorClient",
    "DeadlineExceededError",
    "ExecutorClient",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "MonitorClient",
    "NotFoundError",
    "OrchestratorClient",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "TierstackError",
    "Tls",
    "UnauthenticatedError",
    "UnavailableError",
    "Violation",
]
