"""Failed calls become errors of the one tree in :mod:`tierstack.core.errors`, details parsed."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tierstack.core.errors import (
    BY_CODE,
    Code,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    TierstackError,
    Violation,
)


def from_rpc_error(error: grpc.aio.AioRpcError) -> TierstackError:
    """Returns the tierstack error for a failed call, with the status details parsed."""
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        status = None
    return from_status(error.code().value[0], error.details() or "", status.details if status is not None else ())


def from_status(number: int, message: str, details: Iterable[any_pb2.Any]) -> TierstackError:
    """Returns the tierstack error for a status: its code, its message and its packed details
    (those of a ``google.rpc.Status``)."""
    try:
        code = Code(number)
    except ValueError:
        code = Code.UNKNOWN
    reason = domain = ""
    metadata: dict[str, str] = {}
    violations: list[Violation] = []
    resource = error_details_pb2.ResourceInfo()
    retry = error_details_pb2.RetryInfo()
    for detail in details:
        info = error_details_pb2.ErrorInfo()
        bad_request = error_details_pb2.BadRequest()
        quota_failure = error_details_pb2.QuotaFailure()
        if detail.Unpack(info):
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Unpack(bad_request):
            violations.extend(Violation(v.field, v.description) for v in bad_request.field_violations)
        elif detail.Unpack(quota_failure):
            violations.extend(Violation(v.subject, v.description) for v in quota_failure.violations)
        elif detail.Unpack(retry):
            pass
        else:
            detail.Unpack(resource)
    error_type = BY_CODE.get(code, InternalError)
    if error_type is ResourceExhaustedError:
        retry_after = retry.retry_delay.ToTimedelta().total_seconds() if retry.HasField("retry_delay") else None
        return ResourceExhaustedError(
            violations,
            message=message,
            retry_after=retry_after,
            code=code,
            reason=reason,
            domain=domain,
            metadata=metadata,
        )
    if error_type is InvalidArgumentError:
        return InvalidArgumentError(
            violations, message=message, code=code, reason=reason, domain=domain, metadata=metadata
        )
    if error_type is NotFoundError:
        return NotFoundError(
            resource.resource_type,
            resource.resource_name,
            message=message,
            code=code,
            reason=reason,
            domain=domain,
            metadata=metadata,
        )
    return error_type(message, code=code, reason=reason, domain=domain, metadata=metadata, violations=violations)


@contextmanager
def translate_errors() -> Iterator[None]:
    """Re-raises any ``grpc.aio.AioRpcError`` inside the block as a :class:`TierstackError`."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from exc
