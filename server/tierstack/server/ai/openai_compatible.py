"""A model behind an OpenAI-compatible chat-completions API (OpenAI, Ollama, vLLM, llama.cpp server)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import openai

from tierstack.server.ai.models import Completion, CompletionRequest, Message, ModelError, ToolCallRequest, Usage

_TRANSIENT = (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)


@contextlib.contextmanager
def _translated(where: str) -> Iterator[None]:
    """Turns the client's errors into model errors that say whether to try again."""
    try:
        yield
    except _TRANSIENT as exc:
        raise ModelError("MODEL_UNAVAILABLE", f"{where}: {exc}", transient=True) from exc
    except openai.APIError as exc:
        raise ModelError("MODEL_REJECTED", f"{where}: {exc}", transient=False) from exc


def _message(message: Message) -> dict[str, Any]:
    found: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        found["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
            for c in message.tool_calls
        ]
    if message.tool_call_id:
        found["tool_call_id"] = message.tool_call_id
    return found


class OpenAICompatibleModel:
    """Calls ``POST {base_url}/chat/completions`` through the official ``openai`` client.

    Args:
        base_url: The API's base URL, such as ``http://127.0.0.1:11434/v1`` for Ollama.
        model: The model used when a request names none.
        api_key: The key, if the server wants one.
        timeout: How long one request may take, in seconds.
        max_retries: How often the client itself retries a transient failure (the AI service retries, so
            none by default).
    """

    name = "openai-compatible"

    def __init__(
        self, *, base_url: str, model: str, api_key: str = "", timeout: float = 60.0, max_retries: int = 0
    ) -> None:
        self._model = model
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or "unused",
            timeout=timeout,
            max_retries=max_retries,
            http_client=openai.DefaultAsyncHttpxClient(trust_env=False),  # no proxies from the environment
        )

    async def aclose(self) -> None:
        """Closes the connection pool."""
        await self._client.close()

    async def embed(self, texts: Sequence[str], *, model: str) -> list[list[float]]:
        """Returns one embedding vector per text (``POST {base_url}/embeddings``).

        Raises:
            ModelError: The API could not answer.
        """
        with _translated(f"{self.name}/{model}"):
            response = await self._client.embeddings.create(model=model, input=list(texts))
        return [item.embedding for item in sorted(response.data, key=lambda item: item.index)]

    async def complete(self, request: CompletionRequest) -> Completion:
        model = request.model or self._model
        arguments: dict[str, Any] = {
            "model": model,
            "messages": [_message(message) for message in request.messages],
            "temperature": request.temperature,
        }
        if request.tools:
            arguments["tools"] = [
                {
                    "type": "function",
                    "function": {"name": t.name, "description": t.description, "parameters": dict(t.parameters)},
                }
                for t in request.tools
            ]
        if request.max_tokens is not None:
            arguments["max_tokens"] = request.max_tokens
        with _translated(f"{self.name}/{model}"):
            response = await self._client.chat.completions.create(**arguments)
        if not response.choices:
            raise ModelError("MODEL_EMPTY_ANSWER", f"{self.name}/{model} answered with no choice", transient=True)
        answer = response.choices[0].message
        calls = []
        for call in answer.tool_calls or ():
            try:
                parsed = json.loads(call.function.arguments or "{}")
            except ValueError as exc:
                raise ModelError(
                    "MALFORMED_TOOL_CALL", f"{self.name}/{model} sent arguments that are not JSON", transient=True
                ) from exc
            calls.append(ToolCallRequest(id=call.id, name=call.function.name, arguments=parsed))
        usage = response.usage
        return Completion(
            answer.content or "",
            response.model,
            tuple(calls),
            Usage(usage.prompt_tokens, usage.completion_tokens) if usage is not None else Usage(),
        )
