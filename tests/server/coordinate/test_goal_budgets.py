"""A goal's budget through the SDK: it warns at 80 % and 95 % of each budget once, its time too, and
a goal taken up again after a restart gives no warning twice."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tests.helpers import open_stack, start_tier, wait_for
from tests.server.spender import Spender, warnings
from tierstack.client import CoordinatorClient
from tierstack.core.values import to_duration
from tierstack.server import Settings
from tierstack.v1 import common_pb2
from tierstack.v1 import coordinator_service_pb2 as pb

AGENTS = [pb.Agent(id="spender", capabilities=["general"], max_concurrent_tasks=2)]


def spending_template(folder: Path, *subtasks: tuple[int, str]) -> Path:
    """Writes a template for the goal ``spend``: a chain of ``test.spend`` subtasks, each with its
    complexity and its parameters (YAML)."""
    folder.mkdir()
    lines = [
        f"  - {{id: s{n}, description: spend, required_capabilities: [general], tool: test.spend,"
        f" complexity: {complexity}, dependencies: [{f's{n - 1}' if n else ''}], parameters: {parameters}}}"
        for n, (complexity, parameters) in enumerate(subtasks)
    ]
    (folder / "spend.yaml").write_text("name: spend\npattern: '^spend$'\nsubtasks:\n" + "\n".join(lines))
    return folder


async def test_a_goal_warns_at_80_and_95_percent_of_its_budget_once(tmp_path: Path) -> None:
    # Shares by complexity: 55 of 100 tokens for s0, 37 of the 50 left for s1, the last 15 for s2.
    templates = spending_template(tmp_path / "templates", (5, "{tokens: 50}"), (3, "{tokens: 35}"), (1, "{tokens: 12}"))
    async with open_stack(Settings(data_dir=tmp_path, templates_dir=templates)) as stack:
        Spender(stack.execute)
        limits = common_pb2.ResourceLimits(max_tokens=100)
        started = await stack.coordinator.start_goal(pb.StartGoalRequest(goal="spend", agents=AGENTS, limits=limits))
        events = [e async for e in stack.coordinator.watch_goal(started.goal.goal_id)]
    assert events[-1].HasField("goal_completed"), events[-1]
    assert events[-1].goal_completed.usage.tokens == 97
    assert warnings(events) == [("tokens", 80, 85, 100), ("tokens", 95, 97, 100)]
    finished = [e.sequence for e in events if e.HasField("subtask_finished")]
    warned = [e.sequence for e in events if e.HasField("budget_warning")]
    assert finished[1] < warned[0] < finished[2] < warned[1]  # each given once the usage that earned it is in


async def test_a_goal_warns_at_80_and_95_percent_of_its_time(tmp_path: Path) -> None:
    templates = spending_template(tmp_path / "templates", (1, "{hold: true}"))
    async with open_stack(Settings(data_dir=tmp_path, templates_dir=templates)) as stack:
        spender = Spender(stack.execute)
        limits = common_pb2.ResourceLimits(max_duration=to_duration(0.5))
        request = pb.StartGoalRequest(goal="spend", agents=AGENTS, limits=limits)
        try:
            started = await stack.coordinator.start_goal(request)
            events = [e async for e in stack.coordinator.watch_goal(started.goal.goal_id)]
        finally:
            spender.released.set()
    assert events[-1].goal_failed.error.reason == "DEADLINE_EXCEEDED", events[-1]
    assert [(budget, percent, limit) for budget, percent, _, limit in warnings(events)] == [
        ("duration", 80, 0.5),
        ("duration", 95, 0.5),
    ]


async def test_a_goal_taken_up_again_gives_no_warning_twice(tmp_path: Path, store_url: str) -> None:
    templates = spending_template(tmp_path / "templates", (10, "{tokens: 85}"), (1, "{tokens: 11, hold: true}"))
    settings = Settings(data_dir=tmp_path, templates_dir=templates, store_url=store_url)
    execute = await start_tier("execute", settings)
    spender = Spender(execute)
    orchestrate = await start_tier("orchestrate", dataclasses.replace(settings, execute_target=execute.target))
    wired = dataclasses.replace(settings, orchestrate_target=orchestrate.target, execute_target=execute.target)
    limits = common_pb2.ResourceLimits(max_tokens=100)
    try:
        first = await start_tier("coordinate", wired)
        try:
            async with CoordinatorClient(first.target) as client:
                request = pb.StartGoalRequest(goal="spend", agents=AGENTS, limits=limits)
                goal_id = (await client.start_goal(request)).goal.goal_id
                await wait_for(lambda: len(spender.allowed) == 2)  # s1 is in flight: s0 and its warning are in
        finally:
            await first.stop()
        second = await start_tier("coordinate", wired)
        try:
            async with CoordinatorClient(second.target) as client:
                spender.released.set()
                history = [e async for e in client.watch_goal(goal_id)]
        finally:
            await second.stop()
    finally:
        spender.released.set()
        await orchestrate.stop()
        await execute.stop()
    assert history[-1].HasField("goal_completed"), history[-1]
    assert warnings(history) == [("tokens", 80, 85, 100), ("tokens", 95, 96, 100)]
    kinds = [e.WhichOneof("payload") for e in history]
    assert kinds.index("budget_warning") < kinds.index("goal_resumed")
