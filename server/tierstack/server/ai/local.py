"""The local model: deterministic rules that need no network, the embedded default.

It calls a tool that the last user message names (with the first JSON object in the message as
arguments) unless a tool has answered already; otherwise it answers with the user's request and the
tool results it has seen. Tokens are counted as words.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tierstack.server.ai.models import Completion, CompletionRequest, ToolCallRequest, Usage

_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def _words(text: str) -> int:
    return len(text.split())


class LocalModel:
    """A model that runs in process and always gives the same answer to the same request."""

    name = "local"

    async def complete(self, request: CompletionRequest) -> Completion:
        user = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        results = [m.content for m in request.messages if m.role == "tool"]
        prompt_tokens = sum(_words(m.content) for m in request.messages)
        named = next((tool for tool in request.tools if tool.name in user), None)
        if named is not None and not results:
            arguments: dict[str, Any] = {}
            found = _JSON_OBJECT.search(user)
            if found is not None:
                try:
                    arguments = json.loads(found.group(0))
                except ValueError:
                    arguments = {}
            call = ToolCallRequest(id="call_1", name=named.name, arguments=arguments)
            return Completion("", "local", (call,), Usage(prompt_tokens, 1 + _words(json.dumps(arguments))))
        content = user if not results else f"{user}\n" + "\n".join(f"- {result}" for result in results)
        words = content.split()
        if request.max_tokens is not None and len(words) > request.max_tokens:
            words = words[: request.max_tokens]
            content = " ".join(words)  # cut to the budget, as a model stops at max_tokens
        return Completion(content, "local", (), Usage(prompt_tokens, len(words)))
