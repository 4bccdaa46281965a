"""The local model, and an OpenAI-compatible API over real HTTP on loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from tests.helpers import FakeOpenAI, HttpServer, start_tier
from tierstack.client import ExecutorClient
from tierstack.core.values import from_value, to_struct
from tierstack.server import Settings
from tierstack.server.ai import CompletionRequest, LocalModel, Message, ModelError, ModelTool, OpenAICompatibleModel
from tierstack.v1 import common_pb2, executor_service_pb2

WEATHER = ModelTool("weather.lookup", "Looks up the weather.", {"type": "object", "properties": {"city": {}}})


@pytest.fixture
def fake(http_server: HttpServer) -> FakeOpenAI:
    return FakeOpenAI(http_server)


@pytest.fixture
async def model(fake: FakeOpenAI) -> AsyncIterator[OpenAICompatibleModel]:
    built = OpenAICompatibleModel(base_url=fake.base_url, model="tiny", max_retries=0)
    yield built
    await built.aclose()


async def test_the_local_model_calls_the_tool_it_is_asked_for_then_answers() -> None:
    local = LocalModel()
    ask = Message("user", 'use weather.lookup with {"city": "Oslo"}')
    first = await local.complete(CompletionRequest(messages=(ask,), tools=(WEATHER,)))
    assert [(c.name, c.arguments) for c in first.tool_calls] == [("weather.lookup", {"city": "Oslo"})]
    second = await local.complete(
        CompletionRequest(
            messages=(
                ask,
                Message("assistant", tool_calls=first.tool_calls),
                Message("tool", "12 °C", tool_call_id="call_1"),
            ),
            tools=(WEATHER,),
        )
    )
    assert second.tool_calls == () and second.content.endswith("- 12 °C")
    assert second.usage.total > 0


async def test_an_answer_and_its_usage_come_back(model: OpenAICompatibleModel, fake: FakeOpenAI) -> None:
    completion = await model.complete(
        CompletionRequest(messages=(Message("system", "be brief"), Message("user", "hello")), max_tokens=5)
    )
    assert (completion.content, completion.model, completion.usage.total) == ("echo: hello", "tiny", 18)
    [sent] = fake.requests
    assert sent["max_tokens"] == 5 and [m["role"] for m in sent["messages"]] == ["system", "user"]


async def test_tool_calls_travel_in_the_openai_format(model: OpenAICompatibleModel, fake: FakeOpenAI) -> None:
    fake.replies.append(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "weather.lookup", "arguments": '{"city": "Rome"}'},
                }
            ],
        }
    )
    completion = await model.complete(CompletionRequest(messages=(Message("user", "weather?"),), tools=(WEATHER,)))
    assert [(c.id, c.name, c.arguments) for c in completion.tool_calls] == [("c1", "weather.lookup", {"city": "Rome"})]
    assert fake.requests[0]["tools"][0] == {
        "type": "function",
        "function": {
            "name": "weather.lookup",
            "description": "Looks up the weather.",
            "parameters": WEATHER.parameters,
        },
    }


async def test_failures_say_whether_to_try_again(model: OpenAICompatibleModel, fake: FakeOpenAI) -> None:
    request = CompletionRequest(messages=(Message("user", "hi"),))
    fake.status = 503
    with pytest.raises(ModelError) as unavailable:
        await model.complete(request)
    assert (unavailable.value.reason, unavailable.value.transient) == ("MODEL_UNAVAILABLE", True)
    fake.status = 400
    with pytest.raises(ModelError) as rejected:
        await model.complete(request)
    assert (rejected.value.reason, rejected.value.transient) == ("MODEL_REJECTED", False)
    fake.status = 200
    bad_call = {"id": "c", "type": "function", "function": {"name": "x", "arguments": "{not json"}}
    fake.replies.append({"role": "assistant", "content": None, "tool_calls": [bad_call]})
    with pytest.raises(ModelError) as malformed:
        await model.complete(request)
    assert malformed.value.reason == "MALFORMED_TOOL_CALL"


async def test_ai_complete_counts_its_tokens_in_the_step_and_a_repeat_costs_none(fake: FakeOpenAI) -> None:
    server = await start_tier("execute", Settings(model_base_url=fake.base_url, model="tiny"))
    try:
        async with ExecutorClient(server.target) as client:
            call = common_pb2.ToolCall(tool="ai.complete", arguments=to_struct({"prompt": "a haiku", "system": "poet"}))
            events = [
                e
                async for e in client.execute(
                    executor_service_pb2.ExecuteRequest(progress=True, step_id="s", tool_calls=[call] * 2)
                )
            ]
    finally:
        await server.stop()
    assert from_value(events[-2].output.value) == {"text": "echo: a haiku", "model": "tiny", "tokens": 0, "cost": 0}
    assert events[-1].completed.usage.tokens == 18
    finished = [e.tool_call_finished.result for e in events if e.HasField("tool_call_finished")]
    assert [r.tokens for r in finished] == [18, 0]  # the same prompt again is answered from the cache
    assert len(fake.requests) == 1
    assert json.loads(json.dumps(fake.requests[0]["messages"])) == [
        {"role": "system", "content": "poet"},
        {"role": "user", "content": "a haiku"},
    ]
