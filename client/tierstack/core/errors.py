"""The one tree of errors: what the engines raise, what a server answers with, and what the SDK raises
for a failed call are the same classes. ``tierstack.server.status`` maps them to gRPC statuses and
``tierstack.client.errors`` maps statuses back; nothing here depends on gRPC."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tierstack.v1 import common_pb2

#: The ``ErrorInfo.domain`` of every error tierstack raises.
ERROR_DOMAIN = "tierstack.dev"
#: How many characters of a caller's text an error message quotes.
QUOTE_LIMIT = 48
#: The longest text of a tool's own failure that a result carries.
BRIEF_LIMIT = 300


def quoted(text: str, limit: int = QUOTE_LIMIT) -> str:
    """Returns a caller's ``text`` as an error message may show it: quoted, control characters escaped,
    cut to ``limit`` characters (with an ellipsis) so that no message grows with the input."""
    return repr(text[:limit] + "…") if len(text) > limit else repr(text)


def clip(text: str, most: int) -> str:
    """Returns ``text`` cut to ``most`` characters, an ellipsis marking a cut."""
    return text if len(text) <= most else text[: most - 1] + "…"


def brief(text: str) -> str:
    """Returns the first line of a failure's text, cut to ``BRIEF_LIMIT`` characters: a tool's or a
    library's message may quote whole inputs (a template, an expression) or span many lines."""
    return clip(text.strip().split("\n", 1)[0], BRIEF_LIMIT)


class Code(enum.IntEnum):
    """The canonical status codes (google.rpc.Code), by name and number."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


@dataclass(frozen=True, slots=True)
class Violation:
    """Names one field of a request (or one limit) that is wrong, and says why."""

    field: str
    description: str


class TierstackError(Exception):
    """Base of every error tierstack raises, in a server or in the SDK.

    Args:
        message: What went wrong, for a person.
        code: The status code; each subclass has its own.
        reason: A stable UPPER_SNAKE_CASE identifier for programs (the code's name unless given).
        domain: Who named the reason: :data:`ERROR_DOMAIN` for tierstack's own errors, empty when
            gRPC itself failed a call (its texts name internal addresses and are not passed on).
        metadata: Extra facts (the run, the tool …) carried in the error's details.
        violations: The offending fields (INVALID_ARGUMENT) or the limits hit (RESOURCE_EXHAUSTED).
    """

    default_code = Code.INTERNAL
    default_reason: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: Code | None = None,
        reason: str | None = None,
        domain: str = ERROR_DOMAIN,
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[Violation] = (),
    ):
        self.code = code or self.default_code
        super().__init__(f"{self.code.name}: {message}")
        self.message = message
        self.reason = reason or self.default_reason or self.code.name
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.violations = tuple(violations)


def _summary(violations: Sequence[Violation]) -> str:
    if not violations:
        raise ValueError("an error about fields needs at least one violation, or a message")
    return "; ".join(f"{v.field}: {v.description}" for v in violations)


class InvalidArgumentError(TierstackError):
    """The request is malformed; :attr:`violations` names every offending field."""

    default_code = Code.INVALID_ARGUMENT

    def __init__(self, violations: Sequence[Violation], *, message: str | None = None, **details: Any):
        super().__init__(message or _summary(violations), violations=violations, **details)


class NotFoundError(TierstackError):
    """A named resource does not exist."""

    default_code = Code.NOT_FOUND

    def __init__(
        self,
        resource_type: str,
        name: str,
        *,
        message: str | None = None,
        metadata: Mapping[str, str] | None = None,
        **details: Any,
    ):
        metadata = {"resource_type": resource_type, **(metadata or {})}
        super().__init__(message or f"{resource_type} {quoted(name)} not found", metadata=metadata, **details)
        self.resource_type = resource_type
        self.name = name


class AlreadyExistsError(TierstackError):
    """The resource already exists."""

    default_code = Code.ALREADY_EXISTS


class FailedPreconditionError(TierstackError):
    """The resource is not in a state that allows the request."""

    default_code = Code.FAILED_PRECONDITION


class ResourceExhaustedError(TierstackError):
    """A budget or quota would be exceeded; :attr:`violations` names each limit and why, and
    :attr:`retry_after` (seconds) when the call may succeed if made again later."""

    default_code = Code.RESOURCE_EXHAUSTED

    def __init__(
        self,
        violations: Sequence[Violation],
        *,
        message: str | None = None,
        retry_after: float | None = None,
        **details: Any,
    ):
        super().__init__(message or _summary(violations), violations=violations, **details)
        self.retry_after = retry_after


class DeadlineExceededError(TierstackError):
    """The call's deadline passed."""

    default_code = Code.DEADLINE_EXCEEDED


class CallCancelledError(TierstackError):
    """The call was cancelled (by its caller, or by a server shutting down). Not to be confused with
    ``asyncio.CancelledError``, which tierstack never catches on a caller's behalf."""

    default_code = Code.CANCELLED


class UnauthenticatedError(TierstackError):
    """The call carried no credential that the server accepts."""

    default_code = Code.UNAUTHENTICATED


class PermissionDeniedError(TierstackError):
    """The caller's credential does not allow the request."""

    default_code = Code.PERMISSION_DENIED


class UnavailableError(TierstackError):
    """A server or a dependency (the next tier, a store) cannot be reached; the call may be retried."""

    default_code = Code.UNAVAILABLE


class InternalError(TierstackError):
    """A server failed unexpectedly, or answered with a code that has no class of its own."""

    default_code = Code.INTERNAL


#: The class for each status code; a code not here is an :class:`InternalError` carrying that code.
BY_CODE: Mapping[Code, type[TierstackError]] = {
    Code.INVALID_ARGUMENT: InvalidArgumentError,
    Code.OUT_OF_RANGE: InvalidArgumentError,
    Code.NOT_FOUND: NotFoundError,
    Code.ALREADY_EXISTS: AlreadyExistsError,
    Code.FAILED_PRECONDITION: FailedPreconditionError,
    Code.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    Code.DEADLINE_EXCEEDED: DeadlineExceededError,
    Code.CANCELLED: CallCancelledError,
    Code.UNAUTHENTICATED: UnauthenticatedError,
    Code.PERMISSION_DENIED: PermissionDeniedError,
    Code.UNAVAILABLE: UnavailableError,
}


#: Failure reasons that another attempt, or another agent, would only repeat: nothing about the call
#: changes between attempts.
PERMANENT_FAILURES = frozenset(
    {
        "TEMPLATE_ERROR",
        "INVALID_INPUTS",
        "INVALID_ARGUMENT",
        "INVALID_TOOL_ARGUMENTS",
        "UNKNOWN_TOOL",
        "CONDITION_ERROR",
        "OUTPUT_TOO_LARGE",
        "REQUEST_TOO_LARGE",
    }
)


def error_detail(tier: common_pb2.Tier.ValueType, reason: str, message: str, **metadata: str) -> common_pb2.ErrorDetail:
    """Returns the wire description of a failure that happened in ``tier``."""
    return common_pb2.ErrorDetail(reason=reason, message=message, tier=tier, metadata=metadata)


_UNEXPLAINED = {
    Code.UNAVAILABLE: "cannot be reached",
    Code.DEADLINE_EXCEEDED: "did not answer in time",
    Code.CANCELLED: "cancelled the call",
    Code.RESOURCE_EXHAUSTED: "refused the call: a message or a limit was too large",
}


def message_of(error: TierstackError) -> str:
    """Returns what may be said of ``error`` to a caller: its message when tierstack wrote it, or only
    what the status means when gRPC itself failed a call to the tier below (its texts name internal
    addresses)."""
    if error.domain == ERROR_DOMAIN:
        return error.message
    return f"the tier below {_UNEXPLAINED.get(error.code, f'failed the call ({error.code.name})')}"


def error_detail_of_call(error: TierstackError, tier: common_pb2.Tier.ValueType) -> common_pb2.ErrorDetail:
    """Returns the wire description of a failed call to the tier below (``tier``)."""
    return error_detail(tier, error.reason, message_of(error), **error.metadata)


def output_too_large(
    tier: common_pb2.Tier.ValueType, what: str, size: int, cap: int, **metadata: str
) -> common_pb2.ErrorDetail:
    """Returns the failure of an output over its size cap: ``what`` (such as "a step's output") has
    ``size`` bytes in its wire form, more than ``cap``. Another attempt would not make it smaller."""
    message = f"{size} bytes is too large for {what}; the cap is {cap} bytes"
    return error_detail(tier, "OUTPUT_TOO_LARGE", message, max_bytes=str(cap), **metadata)
