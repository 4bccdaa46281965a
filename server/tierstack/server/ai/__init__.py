"""Models behind one interface (the local deterministic model, OpenAI-compatible APIs) and the AI
service in front of them: budgets, response cache, shared calls, retries, circuit breakers, fallbacks."""

from tierstack.server.ai.accounting import Ledger, Price, Totals
from tierstack.server.ai.cache import ResponseCache
from tierstack.server.ai.local import LocalModel
from tierstack.server.ai.models import (
    Completion,
    CompletionRequest,
    Message,
    ModelError,
    ModelProvider,
    ModelTool,
    Scope,
    ToolCallRequest,
    Usage,
)
from tierstack.server.ai.openai_compatible import OpenAICompatibleModel
from tierstack.server.ai.service import AIService, Resilience

__all__ = [
    "AIService",
    "Completion",
    "CompletionRequest",
    "Ledger",
    "LocalModel",
    "Message",
    "ModelError",
    "ModelProvider",
    "ModelTool",
    "OpenAICompatibleModel",
    "Price",
    "Resilience",
    "ResponseCache",
    "Scope",
    "ToolCallRequest",
    "Totals",
    "Usage",
]
