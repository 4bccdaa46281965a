"""Goals decomposed and carried out by a model: the three real servers and an OpenAI-compatible server
on loopback that counts the calls it receives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import FakeOpenAI, HttpServer, open_stack
from tierstack.client import MonitorClient, UnavailableError
from tierstack.core.values import from_value
from tierstack.server import Settings
from tierstack.v1 import coordinator_service_pb2 as pb
from tierstack.v1.common_pb2 import TIER_COORDINATE as COORDINATE
from tierstack.v1.common_pb2 import TIER_EXECUTE as EXECUTE

AGENTS = [
    pb.Agent(id="researcher", capabilities=["research"], max_concurrent_tasks=2),
    pb.Agent(id="writer", capabilities=["writing"], max_concurrent_tasks=2),
]
PLAN = {
    "subtasks": [
        {"id": "facts", "description": "list three facts about otters", "required_capabilities": ["research"]},
        {"id": "more", "description": "list three facts about beavers", "required_capabilities": ["research"]},
        {
            "id": "poem",
            "description": "write a poem from the facts",
            "dependencies": ["facts", "more"],
            "complexity": 4,
            "required_capabilities": ["writing"],
            "priority": "high",
        },
    ]
}
GOAL = "write a poem about otters and beavers from facts about them"


def answer(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


async def test_a_model_plans_and_carries_out_a_goal_and_a_repeat_needs_no_model(
    http_server: HttpServer, data_dir: Path
) -> None:
    fake = FakeOpenAI(http_server)
    # The first answer is malformed: a cycle and an unknown field. The model is told why and asked again.
    bad = {"subtasks": [{"id": "a", "description": "x", "dependencies": ["a"], "colour": "red"}]}
    fake.replies += [answer(json.dumps(bad)), answer("```json\n" + json.dumps(PLAN) + "\n```")]
    settings = Settings(data_dir=data_dir, model_base_url=fake.base_url, model="tiny")
    async with open_stack(settings) as stack:
        request = pb.CoordinateRequest(goal=GOAL, agents=AGENTS)
        events = [event async for event in stack.coordinator.coordinate(request)]
        decomposed = events[0].goal_decomposed
        assert (decomposed.source, decomposed.producer) == (pb.DECOMPOSITION_SOURCE_MODEL, "model:tiny")
        assert [(s.id, s.tool, list(s.dependencies)) for s in decomposed.subtasks] == [
            ("facts", "ai.complete", []),
            ("more", "ai.complete", []),
            ("poem", "ai.complete", ["facts", "more"]),
        ]
        retry = fake.requests[1]["messages"][-1]["content"]
        assert "not valid" in retry and "colour" in retry
        assert events[-1].HasField("goal_completed"), events[-1]
        poem = from_value(events[-1].goal_completed.outputs["poem"])
        assert isinstance(poem, dict) and isinstance(poem["text"], str)
        # The fake echoes the prompt: the poem's prompt held both facts' outputs.
        assert "echo: list three facts about otters" in poem["text"]
        assert "echo: list three facts about beavers" in poem["text"]
        assert events[-1].goal_completed.usage.tokens == 3 * 18
        calls = len(fake.requests)
        assert calls == 2 + 3  # two decomposition answers, one per subtask
        async with MonitorClient(stack.coordinate.target) as monitor:
            coordinate, execute = (await monitor.get_metrics(tiers=[COORDINATE, EXECUTE])).tiers
        assert coordinate.coordinate.model.by_model["tiny"].requests == 2  # the tokens of each tier's calls
        assert execute.execute.model.by_model["tiny"].completion_tokens == 3 * 7

        again = [event async for event in stack.coordinator.coordinate(request)]
        assert again[0].goal_decomposed.source == pb.DECOMPOSITION_SOURCE_SIMILAR_GOAL
        assert again[-1].HasField("goal_completed")
        assert from_value(again[-1].goal_completed.outputs["poem"]) == {**poem, "tokens": 0}
        assert again[-1].goal_completed.usage.tokens == 0
        assert len(fake.requests) == calls  # the repeated goal asked no model


async def test_a_model_that_never_answers_validly_fails_clearly(http_server: HttpServer, data_dir: Path) -> None:
    fake = FakeOpenAI(http_server)
    fake.replies += [answer("I would rather not.")] * 3 + [answer(json.dumps(PLAN))]
    settings = Settings(data_dir=data_dir, model_base_url=fake.base_url, model="tiny")
    async with open_stack(settings) as stack:
        with pytest.raises(UnavailableError) as caught:
            await stack.coordinator.decompose_goal(pb.DecomposeGoalRequest(goal=GOAL, agents=AGENTS))
        assert caught.value.reason == "MODEL_DECOMPOSITION_INVALID"
        assert "in 3 answers" in caught.value.message and "not JSON" in caught.value.message
        later = await stack.coordinator.decompose_goal(pb.DecomposeGoalRequest(goal="another goal", agents=AGENTS))
        assert len(later.subtasks) == 3
    assert len(fake.requests) == 4  # three answers, and the server kept serving


async def test_goal_similarity_by_embeddings(http_server: HttpServer, data_dir: Path) -> None:
    fake = FakeOpenAI(http_server)
    settings = Settings(data_dir=data_dir, model_base_url=fake.base_url, embedding_model="embed-small")
    writers = [pb.Agent(id="writer", capabilities=["writing", "analysis"])]
    past = "analyze the survey of 2024, then write a summary of the survey"
    async with open_stack(settings) as stack:
        started = await stack.coordinator.start_goal(pb.StartGoalRequest(goal=past, agents=writers))
        events = [event async for event in stack.coordinator.watch_goal(started.goal.goal_id)]
    assert (
        events[0].goal_decomposed.source == pb.DECOMPOSITION_SOURCE_MODEL
    )  # the local rules: TIERSTACK_MODEL is local
    assert events[-1].HasField("goal_completed"), events[-1]

    async def decompose(goal: str) -> pb.DecomposeGoalResponse:
        async with open_stack(settings) as stack:  # a new server each time: the memory is reloaded
            return await stack.coordinator.decompose_goal(pb.DecomposeGoalRequest(goal=goal, agents=writers))

    again = await decompose("Analyze the survey of 2025, then write a summary of the survey.")
    assert (again.source, again.similar_goal, dict(again.rebound_particulars)) == (
        pb.DECOMPOSITION_SOURCE_SIMILAR_GOAL,
        past,
        {"2024": "2025"},
    )
    other = await decompose("translate the menu")
    assert other.source == pb.DECOMPOSITION_SOURCE_MODEL
    assert "analyze survey of <number> then write summary of survey" in fake.embedded  # goals by their shape
    assert not fake.requests  # no completions: embeddings alone
