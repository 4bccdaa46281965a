"""Models behind one interface: the local deterministic model and OpenAI-compatible APIs."""

from tierstack.server.ai.local import LocalModel
from tierstack.server.ai.models import (
    Completion,
    CompletionRequest,
    Message,
    ModelError,
    ModelProvider,
    ModelTool,
    ToolCallRequest,
    Usage,
)
from tierstack.server.ai.openai_compatible import OpenAICompatibleModel

__all__ = [
    "Completion",
    "CompletionRequest",
    "LocalModel",
    "Message",
    "ModelError",
    "ModelProvider",
    "ModelTool",
    "OpenAICompatibleModel",
    "ToolCallRequest",
    "Usage",
]
