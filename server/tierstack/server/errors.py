"""Domain errors raised by the engines; one place (``status``) maps them to gRPC statuses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tierstack.client.errors import TierstackError
from tierstack.v1 import common_pb2

#: The ``ErrorInfo.domain`` of every error tierstack raises.
ERROR_DOMAIN = "tierstack.dev"
#: How many characters of a caller's text an error message quotes.
QUOTE_LIMIT = 48


def quoted(text: str, limit: int = QUOTE_LIMIT) -> str:
    """Returns a caller's ``text`` as an error message may show it: quoted, control characters escaped,
    cut to ``limit`` characters (with an ellipsis) so that no message grows with the input."""
    return repr(text[:limit] + "…") if len(text) > limit else repr(text)


#: The longest text of a tool's own failure that a result carries.
BRIEF_LIMIT = 300


def clip(text: str, most: int) -> str:
    """Returns ``text`` cut to ``most`` characters, an ellipsis marking a cut."""
    return text if len(text) <= most else text[: most - 1] + "…"


def brief(text: str) -> str:
    """Returns the first line of a failure's text, cut to ``BRIEF_LIMIT`` characters: a tool's or a
    library's message may quote whole inputs (a template, an expression) or span many lines."""
    return clip(text.strip().split("\n", 1)[0], BRIEF_LIMIT)


@dataclass(frozen=True, slots=True)
class Violation:
    """Names one field of a request that is wrong and says why."""

    field: str
    description: str


class DomainError(Exception):
    """Base of the errors the engines raise for the caller to see.

    Args:
        message: What went wrong, for a person.
        reason: A stable UPPER_SNAKE_CASE identifier for programs.
        metadata: Extra facts (the run, the tool …) carried in the error's details.
    """

    default_reason = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})


class InvalidArgumentError(DomainError):
    """The request is malformed; ``violations`` names every offending field."""

    default_reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[Violation], *, reason: str | None = None):
        if not violations:
            raise ValueError("InvalidArgumentError needs at least one violation")
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(summary, reason=reason)
        self.violations = tuple(violations)


class NotFoundError(DomainError):
    """A named resource does not exist."""

    default_reason = "NOT_FOUND"

    def __init__(self, resource_type: str, name: str):
        super().__init__(f"{resource_type} {quoted(name)} not found", metadata={"resource_type": resource_type})
        self.resource_type = resource_type
        self.name = name


class FailedPreconditionError(DomainError):
    """The resource is not in a state that allows the request."""

    default_reason = "FAILED_PRECONDITION"


class ResourceExhaustedError(DomainError):
    """A budget or quota would be exceeded; ``violations`` names each limit (subject) and why."""

    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(self, violations: Sequence[Violation], *, reason: str | None = None):
        if not violations:
            raise ValueError("ResourceExhaustedError needs at least one violation")
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations), reason=reason)
        self.violations = tuple(violations)


class UnavailableError(DomainError):
    """A dependency (the next tier, a store) cannot be reached; the call may be retried."""

    default_reason = "UNAVAILABLE"


def error_detail(tier: common_pb2.Tier.ValueType, reason: str, message: str, **metadata: str) -> common_pb2.ErrorDetail:
    """Returns the wire description of a failure that happened in ``tier``."""
    return common_pb2.ErrorDetail(reason=reason, message=message, tier=tier, metadata=metadata)


_UNEXPLAINED = {
    "UNAVAILABLE": "cannot be reached",
    "DEADLINE_EXCEEDED": "did not answer in time",
    "CANCELLED": "cancelled the call",
    "RESOURCE_EXHAUSTED": "refused the call: a message or a limit was too large",
}


def message_of_call(error: TierstackError) -> str:
    """Returns what may be said of a failed call to the tier below: the message a tierstack server
    wrote, or only what the status means when gRPC itself failed the call (its texts name internal
    addresses)."""
    if error.domain == ERROR_DOMAIN:
        return error.message
    return f"the tier below {_UNEXPLAINED.get(error.code.name, f'failed the call ({error.code.name})')}"


def error_detail_of_call(error: TierstackError, tier: common_pb2.Tier.ValueType) -> common_pb2.ErrorDetail:
    """Returns the wire description of a failed call to the tier below (``tier``)."""
    return error_detail(tier, error.reason, message_of_call(error), **error.metadata)


def output_too_large(
    tier: common_pb2.Tier.ValueType, what: str, size: int, cap: int, **metadata: str
) -> common_pb2.ErrorDetail:
    """Returns the failure of an output over its size cap: ``what`` (such as "a step's output") has
    ``size`` bytes in its wire form, more than ``cap``. Another attempt would not make it smaller."""
    message = f"{size} bytes is too large for {what}; the cap is {cap} bytes"
    return error_detail(tier, "OUTPUT_TOO_LARGE", message, max_bytes=str(cap), **metadata)
