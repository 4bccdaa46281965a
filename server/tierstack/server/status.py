"""The one place where domain errors become gRPC statuses with google.rpc error details."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tierstack.core.errors import (
    ERROR_DOMAIN,
    Code,
    NotFoundError,
    ResourceExhaustedError,
    TierstackError,
    Violation,
    clip,
    message_of,
)
from tierstack.server.boundary import MAX_VIOLATIONS

__all__ = ["ERROR_DOMAIN", "status_of", "to_grpc_status"]

#: The longest message, violation field and violation description an answer carries: a status must
#: fit in the trailers whatever the request held.
MAX_MESSAGE = 1024
MAX_FIELD = 256
MAX_DESCRIPTION = 512


def _bad_request(violations: Sequence[Violation]) -> error_details_pb2.BadRequest:
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


def _quota_failure(violations: Iterable[Violation]) -> error_details_pb2.QuotaFailure:
    return error_details_pb2.QuotaFailure(
        violations=[
            error_details_pb2.QuotaFailure.Violation(
                subject=clip(v.field, MAX_FIELD), description=clip(v.description, MAX_DESCRIPTION)
            )
            for v in violations
        ]
    )


def to_grpc_status(error: TierstackError) -> grpc.Status:
    """Returns the status a servicer aborts with for ``error`` (see :func:`status_of`)."""
    status: grpc.Status = rpc_status.to_status(status_of(error))
    return status


def status_of(error: TierstackError) -> status_pb2.Status:
    """Returns the status of a call that failed with ``error``, carrying ErrorInfo and, where they
    fit, BadRequest field violations, QuotaFailure, RetryInfo or ResourceInfo. A failed call to the tier below
    keeps its code, reason, metadata and violations, not the texts gRPC wrote for it."""
    details: list[Any] = [
        error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
    ]
    if error.violations:
        fields = error.code in (Code.INVALID_ARGUMENT, Code.OUT_OF_RANGE)
        details.append(_bad_request(error.violations) if fields else _quota_failure(error.violations))
    if isinstance(error, ResourceExhaustedError) and error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(datetime.timedelta(seconds=error.retry_after))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    if isinstance(error, NotFoundError) and error.resource_type:
        details.append(
            error_details_pb2.ResourceInfo(resource_type=error.resource_type, resource_name=clip(error.name, MAX_FIELD))
        )
    return _status(int(error.code), message_of(error), details)


def _status(code: int, message: str, details: list[Any]) -> status_pb2.Status:
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return status_pb2.Status(code=code, message=clip(message, MAX_MESSAGE), details=packed)
