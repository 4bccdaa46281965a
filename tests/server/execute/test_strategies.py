"""Strategies: selection by request, policy and track record; deterministic memo and retries; the
conversational and reasoning strategies against a real OpenAI-compatible endpoint on loopback."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.helpers import FakeOpenAI, HttpServer, start_tier
from tierstack.client import ExecutorClient
from tierstack.client import InvalidArgumentError as InvalidArgumentRpcError
from tierstack.core.errors import InvalidArgumentError
from tierstack.core.values import JSON, from_value, to_struct
from tierstack.server import Settings, TierServer
from tierstack.server.execute import Executor, ToolError, ToolRegistry, tool
from tierstack.server.execute.engine import TOOLKIT_CACHE_SIZE, Toolkit
from tierstack.server.execute.service import ExecuteService
from tierstack.server.execute.strategies import CONVERSATIONAL, DETERMINISTIC, REASONING, StrategySelector
from tierstack.v1 import common_pb2, executor_service_pb2

UNSPECIFIED = common_pb2.STRATEGY_UNSPECIFIED


def choose(selector: StrategySelector, requested: Any, **overrides: Any) -> tuple[int, str]:
    arguments: dict[str, Any] = {
        "step_key": "s",
        "requested": requested,
        "has_calls": True,
        "sensitive": False,
        "max_seconds": None,
        "max_credits": 0.0,
        "complexity": 0,
    }
    arguments.update(overrides)
    found = selector.select(**arguments)
    return found.chosen, found.reason


def test_selection_follows_request_policy_then_track_record() -> None:
    selector = StrategySelector()
    assert choose(selector, UNSPECIFIED) == (DETERMINISTIC, "")
    assert choose(selector, UNSPECIFIED, has_calls=False) == (CONVERSATIONAL, "")
    assert choose(selector, CONVERSATIONAL, sensitive=True) == (DETERMINISTIC, "the step handles sensitive data")
    assert choose(selector, REASONING, max_seconds=2.0) == (DETERMINISTIC, "the step must finish within 2 s")
    assert choose(selector, CONVERSATIONAL, has_calls=False, max_seconds=2.0) == (CONVERSATIONAL, "")
    assert choose(selector, CONVERSATIONAL, max_credits=0.005) == (REASONING, "the step may spend only 0.005 credits")
    conversations = selector.record("s", CONVERSATIONAL)
    for success in [True] * 7 + [False] * 2:
        conversations.add(success=success)
    assert choose(selector, CONVERSATIONAL) == (CONVERSATIONAL, "")  # 7 of 9: too few runs
    conversations.add(success=True)
    assert choose(selector, CONVERSATIONAL) == (REASONING, "graduated: 8 of 10 conversational runs succeeded")
    reasoning = selector.record("s", REASONING)
    for index in range(50):
        reasoning.add(success=index != 0, routine=(("core.echo", {"value": index}),))
    assert choose(selector, REASONING, has_calls=False, complexity=5)[0] == REASONING
    low = selector.select(
        step_key="s",
        requested=REASONING,
        has_calls=False,
        sensitive=False,
        max_seconds=None,
        max_credits=0,
        complexity=2,
    )
    assert (low.chosen, low.routine) == (DETERMINISTIC, (("core.echo", {"value": 49}),))
    assert low.reason == "graduated: 49 of 50 reasoning runs succeeded; replaying their plan"


@pytest.fixture
def fake(http_server: HttpServer) -> FakeOpenAI:
    return FakeOpenAI(http_server)


@pytest.fixture
async def executor(fake: FakeOpenAI) -> AsyncIterator[tuple[TierServer, ExecutorClient]]:
    server = await start_tier("execute", Settings(model_base_url=fake.base_url, model="tiny"))
    async with ExecutorClient(server.target) as client:
        yield server, client
    await server.stop()


def tool_call(name: str, arguments: dict[str, Any], call_id: str = "c1") -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
        ],
    }


def step(strategy: Any, prompt: str, *tools: str, **limits: Any) -> executor_service_pb2.ExecuteRequest:
    return executor_service_pb2.ExecuteRequest(
        progress=True,
        step_id="s",
        strategy=strategy,
        prompt=prompt,
        tools=tools,
        limits=common_pb2.ResourceLimits(**limits),
    )


async def test_the_conversational_strategy_loops_through_tool_calls(
    executor: tuple[TierServer, ExecutorClient], fake: FakeOpenAI
) -> None:
    _, client = executor
    fake.replies += [
        tool_call("json.query", {"data": [3, 1, 2], "expression": "max(@)"}),
        tool_call("nope.tool", {}, "c2"),
        {"role": "assistant", "content": "The largest is 3."},
    ]
    events = [e async for e in client.execute(step(CONVERSATIONAL, "what is the largest?", "json.query"))]
    kinds = [e.WhichOneof("payload") for e in events]
    assert kinds == [
        "started",
        "strategy_selected",
        "model_replied",
        "tool_call_started",
        "tool_call_finished",
        "model_replied",
        "model_replied",
        "output",
        "completed",
    ]
    assert events[0].started.strategy == CONVERSATIONAL
    assert from_value(events[-2].output.value) == "The largest is 3."
    assert (events[-1].completed.usage.tokens, events[-1].completed.usage.tool_calls) == (54, 1)
    second, third = fake.requests[1], fake.requests[2]
    assert second["messages"][-1] == {"role": "tool", "content": "3", "tool_call_id": "c1"}
    assert third["messages"][-1]["content"].startswith("error: nope.tool cannot run")
    assert [t["function"]["name"] for t in second["tools"]] == ["json.query"]


async def test_the_reasoning_strategy_analyses_plans_executes_and_refines(
    executor: tuple[TierServer, ExecutorClient], fake: FakeOpenAI
) -> None:
    _, client = executor
    plan = tool_call("json.query", {"data": {"a": 1}, "expression": "a"})
    plan["tool_calls"].append(
        {"id": "c2", "type": "function", "function": {"name": "core.echo", "arguments": '{"value": "x"}'}}
    )
    fake.replies += [
        {"role": "assistant", "content": "Need a and x."},
        plan,
        {"role": "assistant", "content": "a=1, x"},
    ]
    events = [e async for e in client.execute(step(REASONING, "combine a and x", "json.query", "core.echo"))]
    phases = [e.model_replied.phase for e in events if e.HasField("model_replied")]
    assert phases == ["analyse", "plan", "refine"]
    finished = [from_value(e.tool_call_finished.result.output) for e in events if e.HasField("tool_call_finished")]
    assert finished == [1, "x"]
    assert from_value(events[-2].output.value) == "a=1, x"
    assert "tools" not in fake.requests[0] and "tools" in fake.requests[1] and "tools" not in fake.requests[2]
    refine = fake.requests[2]["messages"]
    assert [m["role"] for m in refine] == ["system", "user", "assistant", "assistant", "tool", "tool"]


async def test_a_token_budget_shrinks_the_answers_and_stops_the_step(
    executor: tuple[TierServer, ExecutorClient], fake: FakeOpenAI
) -> None:
    _, client = executor
    fake.replies += [tool_call("core.echo", {"value": 1}), tool_call("core.echo", {"value": 2})]
    events = [e async for e in client.execute(step(CONVERSATIONAL, "echo", "core.echo", max_tokens=100))]
    # Each answer may use what the prompt leaves of the budget; each call of the fake spends 18 tokens.
    first, second = (r["max_tokens"] for r in fake.requests)
    assert 100 - 18 > first > second + 18
    assert events[-1].failed.error.reason == "TOKEN_BUDGET_EXHAUSTED"


async def test_conversations_graduate_to_reasoning(executor: tuple[TierServer, ExecutorClient]) -> None:
    _, client = executor
    for _ in range(10):
        events = [e async for e in client.execute(step(CONVERSATIONAL, "say hi", "core.echo"))]
        assert events[1].strategy_selected.chosen == CONVERSATIONAL
    events = [e async for e in client.execute(step(CONVERSATIONAL, "say hi", "core.echo"))]
    selected = events[1].strategy_selected
    assert (selected.requested, selected.chosen) == (CONVERSATIONAL, REASONING)
    assert selected.reason == "graduated: 10 of 10 conversational runs succeeded"


async def test_the_local_model_drives_a_conversation_without_network() -> None:
    server = await start_tier("execute", Settings())
    try:
        async with ExecutorClient(server.target) as client:
            prompt = 'use core.echo with {"value": 42}'
            events = [e async for e in client.execute(step(UNSPECIFIED, prompt, "core.echo"))]
            with pytest.raises(InvalidArgumentRpcError) as caught:
                sensitive = step(UNSPECIFIED, prompt, "core.echo")
                sensitive.sensitive = True
                _ = [e async for e in client.execute(sensitive)]
    finally:
        await server.stop()
    assert events[0].started.strategy == CONVERSATIONAL
    assert from_value(events[-2].output.value) == f"{prompt}\n- 42"
    assert caught.value.violations[0].field == "tool_calls"


calls: Counter[str] = Counter()


# Coroutines, so that they run in this process, where the test counts their calls.
@tool("test.pure", pure=True)
async def pure(n: int) -> int:
    calls["pure"] += 1
    return n * n


@tool("test.shaky", critical=True)
async def shaky(key: str) -> str:
    calls[key] += 1
    if calls[key] < 3:
        raise ToolError("SHAKY", f"try {calls[key]}")
    return "steady"


async def test_deterministic_steps_remember_pure_results_and_retry_critical_tools() -> None:
    server = await start_tier("execute", Settings())
    service = server.service
    assert isinstance(service, ExecuteService)
    service.registry.register(pure)
    service.registry.register(shaky)

    def request(name: str, arguments: dict[str, JSON]) -> executor_service_pb2.ExecuteRequest:
        call = common_pb2.ToolCall(tool=name, arguments=to_struct(arguments))
        return executor_service_pb2.ExecuteRequest(progress=True, step_id="d", tool_calls=[call])

    try:
        async with ExecutorClient(server.target) as client:
            first = [e async for e in client.execute(request("test.pure", {"n": 7}))]
            again = [e async for e in client.execute(request("test.pure", {"n": 7}))]
            other = [e async for e in client.execute(request("test.pure", {"n": 8}))]
            retried = [e async for e in client.execute(request("test.shaky", {"key": "k"}))]
    finally:
        await server.stop()
    assert [from_value(events[-2].output.value) for events in (first, again, other)] == [49, 49, 64]
    assert calls["pure"] == 2
    assert (again[-1].completed.usage.tool_calls, first[-1].completed.usage.tool_calls) == (0, 1)
    assert from_value(retried[-2].output.value) == "steady"
    assert retried[-1].completed.usage.tool_calls == 3


def test_tool_kits_are_prepared_once_per_tool_set_and_bounded() -> None:
    registry = ToolRegistry()
    for index in range(TOOLKIT_CACHE_SIZE + 5):
        registry.register(tool(f"t{index}")(_identity))
    executor = Executor(registry)

    def kit_for(*names: str) -> Toolkit:
        return executor.toolkit(executor_service_pb2.ExecuteRequest(tools=names), [])

    first = kit_for("t0", "t1")
    assert kit_for("t0", "t1") is first
    assert [t.name for t in first.model_tools] == ["t0", "t1"]
    for index in range(TOOLKIT_CACHE_SIZE + 5):
        kit_for(f"t{index}")
    assert kit_for("t0", "t1") is not first  # the oldest kit was evicted
    with pytest.raises(InvalidArgumentError) as caught:
        kit_for("t0", "missing")
    assert caught.value.violations[0].field == "tools[1]"


def _identity(value: int = 0) -> int:
    return value
