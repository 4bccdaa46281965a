"""The SDK's exception tree: every failed call raises a :class:`TierstackError` subclass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One offending request field, from the error's BadRequest details."""

    field: str
    description: str


class TierstackError(Exception):
    """A call to a tierstack server failed.

    Attributes:
        code: The gRPC status code.
        message: The server's message.
        reason: The ErrorInfo reason (UPPER_SNAKE_CASE), or the code's name when the server sent none.
        domain: The ErrorInfo domain, empty when the server sent none.
        metadata: The ErrorInfo metadata.
        field_violations: The BadRequest field violations, for INVALID_ARGUMENT.
        quota_violations: The QuotaFailure violations (the limit as ``field``), for RESOURCE_EXHAUSTED.
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode,
        reason: str = "",
        domain: str = "",
        metadata: dict[str, str] | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        quota_violations: tuple[FieldViolation, ...] = (),
    ):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason or code.name
        self.domain = domain
        self.metadata = metadata or {}
        self.field_violations = field_violations
        self.quota_violations = quota_violations


class InvalidArgumentError(TierstackError):
    """The request was malformed; see :attr:`field_violations`."""


class NotFoundError(TierstackError):
    """A named resource does not exist."""


class AlreadyExistsError(TierstackError):
    """The resource already exists."""


class FailedPreconditionError(TierstackError):
    """The resource is not in a state that allows the request."""


class ResourceExhaustedError(TierstackError):
    """A budget or quota would be exceeded."""


class DeadlineExceededError(TierstackError):
    """The call's deadline passed."""


class CancelledError(TierstackError):
    """The call was cancelled."""


class UnavailableError(TierstackError):
    """The server could not be reached or is shutting down; the call may be retried."""


class InternalError(TierstackError):
    """The server failed unexpectedly."""


_BY_CODE: dict[grpc.StatusCode, type[TierstackError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
}


def from_rpc_error(error: grpc.aio.AioRpcError) -> TierstackError:
    """Returns the SDK exception for a failed call, with the status details parsed."""
    code = error.code()
    reason = domain = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    quota: list[FieldViolation] = []
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        status = None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        bad_request = error_details_pb2.BadRequest()
        quota_failure = error_details_pb2.QuotaFailure()
        if detail.Unpack(info):
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Unpack(bad_request):
            violations.extend(FieldViolation(v.field, v.description) for v in bad_request.field_violations)
        elif detail.Unpack(quota_failure):
            quota.extend(FieldViolation(v.subject, v.description) for v in quota_failure.violations)
    error_type = _BY_CODE.get(code, InternalError)
    return error_type(
        error.details() or "",
        code=code,
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=tuple(violations),
        quota_violations=tuple(quota),
    )


@contextmanager
def translate_errors() -> Iterator[None]:
    """Re-raises any ``grpc.aio.AioRpcError`` inside the block as a :class:`TierstackError`."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from exc
