"""The model interface every provider implements, as plain values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from tierstack.client.values import JSON


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
class CompletionRequest:
    """What a model is asked."""

    messages: tuple[Message, ...]
    model: str = ""
    tools: tuple[ModelTool, ...] = ()
    max_tokens: int | None = None
    temperature: float = 0.0


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
