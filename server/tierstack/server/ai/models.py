"""The model interface every provider implements, as plain values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from tierstack.core.values import JSON


@dataclass(frozen=True, slots=True)
class ToolCallRequest:
    """A tool call a model asks for."""

    id: str
    name: str
    arguments: dict[str, JSON]


@dataclass(frozen=True, slots=True)
class Message:
    """One message of a conversation with a model."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: tuple[ToolCallRequest, ...] = ()
    tool_call_id: str = ""


@dataclass(frozen=True, slots=True)
class ModelTool:
    """A tool offered to a model: its name, what it does, and its JSON Schema."""

    name: str
    description: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class Scope:
    """Who a model call is made for, and how many tokens it may still use.

    Attributes:
        tenant: The tenant charged; tenants may have token budgets of their own.
        run: The run (or step, or goal) charged.
        token_budget: The tokens left to the caller; None is no limit.
    """

    tenant: str = ""
    run: str = ""
    token_budget: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CompletionRequest:
    """What a model is asked, and on whose account (``scope`` is not part of the question)."""

    messages: tuple[Message, ...]
    model: str = ""
    tools: tuple[ModelTool, ...] = ()
    max_tokens: int | None = None
    temperature: float = 0.0
    scope: Scope = field(default_factory=Scope)


@dataclass(frozen=True, slots=True)
class Usage:
    """The tokens one completion used."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total(self) -> int:
        """Returns prompt and completion tokens together."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Completion:
    """A model's answer: text, tool calls, or both."""

    content: str
    model: str
    tool_calls: tuple[ToolCallRequest, ...] = ()
    usage: Usage = field(default_factory=Usage)
    #: True when the answer came from the response cache: its usage was paid by an earlier call.
    cached: bool = False
    #: What the call cost in credits (the AI service prices it; nothing when cached).
    cost: float = 0.0
    #: True when a fallback model answered because the requested one could not.
    fallback: bool = False

    @property
    def spent(self) -> int:
        """Returns the tokens this answer cost now: none when it came from the cache."""
        return 0 if self.cached else self.usage.total


class ModelError(Exception):
    """A model could not answer.

    Args:
        reason: A stable UPPER_SNAKE_CASE identifier, such as ``MODEL_UNAVAILABLE``.
        message: What went wrong, for a person.
        transient: Whether the same request may succeed later.
    """

    def __init__(self, reason: str, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.transient = transient


class ModelProvider(Protocol):
    """Answers completion requests."""

    #: Names the provider, for events and logs.
    name: str

    async def complete(self, request: CompletionRequest) -> Completion:
        """Returns the model's answer.

        Raises:
            ModelError: The model could not answer.
        """
        ...
