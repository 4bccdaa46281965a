"""The one place where domain errors become gRPC statuses with google.rpc error details."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tierstack.client.errors import TierstackError
from tierstack.server.boundary import MAX_VIOLATIONS
from tierstack.server.errors import (
    ERROR_DOMAIN,
    DomainError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    clip,
    message_of_call,
)

__all__ = ["ERROR_DOMAIN", "code_of", "to_grpc_status"]

#: The longest message, violation field and violation description an answer carries: a status must
#: fit in the trailers whatever the request held.
MAX_MESSAGE = 1024
MAX_FIELD = 256
MAX_DESCRIPTION = 512

_CODES: tuple[tuple[type[DomainError], int], ...] = (
    (InvalidArgumentError, code_pb2.INVALID_ARGUMENT),
    (NotFoundError, code_pb2.NOT_FOUND),
    (FailedPreconditionError, code_pb2.FAILED_PRECONDITION),
    (ResourceExhaustedError, code_pb2.RESOURCE_EXHAUSTED),
    (UnavailableError, code_pb2.UNAVAILABLE),
)


def code_of(error: DomainError) -> int:
    """Returns the google.rpc code number for a domain error."""
    for error_type, code in _CODES:
        if isinstance(error, error_type):
            return int(code)
    return int(code_pb2.INTERNAL)


class _Named(Protocol):
    """A violation: the field (or limit) it names, and why."""

    @property
    def field(self) -> str: ...

    @property
    def description(self) -> str: ...


def _bad_request(violations: Sequence[_Named]) -> error_details_pb2.BadRequest:
    shown = [
        error_details_pb2.BadRequest.FieldViolation(
            field=clip(v.field, MAX_FIELD), description=clip(v.description, MAX_DESCRIPTION)
        )
        for v in violations[:MAX_VIOLATIONS]
    ]
    if len(violations) > MAX_VIOLATIONS:  # the rest would not fit the trailers
        shown[-1].description = clip(
            f"{shown[-1].description} (and {len(violations) - MAX_VIOLATIONS} more)", MAX_DESCRIPTION
        )
    return error_details_pb2.BadRequest(field_violations=shown)


def _quota_failure(violations: Iterable[_Named]) -> error_details_pb2.QuotaFailure:
    return error_details_pb2.QuotaFailure(
        violations=[
            error_details_pb2.QuotaFailure.Violation(
                subject=clip(v.field, MAX_FIELD), description=clip(v.description, MAX_DESCRIPTION)
            )
            for v in violations
        ]
    )


def to_grpc_status(error: DomainError | TierstackError) -> grpc.Status:
    """Returns the status a servicer aborts with for ``error``, carrying ErrorInfo and, where they
    fit, BadRequest field violations, QuotaFailure or ResourceInfo. A failed call to the tier below
    keeps its code, reason, metadata and violations."""
    details = [error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)]
    if isinstance(error, TierstackError):
        if error.field_violations:
            details.append(_bad_request(error.field_violations))
        if error.quota_violations:
            details.append(_quota_failure(error.quota_violations))
        return _status(int(error.code.value[0]), message_of_call(error), details)
    if isinstance(error, InvalidArgumentError):
        details.append(_bad_request(error.violations))
    if isinstance(error, ResourceExhaustedError):
        details.append(_quota_failure(error.violations))
    if isinstance(error, NotFoundError):
        details.append(
            error_details_pb2.ResourceInfo(resource_type=error.resource_type, resource_name=clip(error.name, MAX_FIELD))
        )
    return _status(code_of(error), error.message, details)


def _status(code: int, message: str, details: list[Any]) -> grpc.Status:
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code, message=clip(message, MAX_MESSAGE), details=packed)
    )
    return status
