"""Tier 1's own costs, each beside a baseline measured in the same run.

1. Coordinate's overhead for a 10-subtask goal: the coordinator (decomposition by a provider that
   answers at once, team formation, scheduling, events) over a Tier 2 that finishes every run at
   once, against the same ten runs driven by a bare loop in dependency order; and the same goal
   kept durable, in a SQLite goal store as the server keeps it.
2. Team formation for 200 agents x 200 subtasks (``form_team``), against scipy's
   ``linear_sum_assignment`` alone on a random cost matrix of the same shape.
3. Model calls saved by sharing calls in flight: 100 concurrent completion requests, all distinct
   and then 10 prompts asked 10 times each, and 100 concurrent one-text embedding requests, through
   the AI service (its cache empty) against the same requests sent straight to the model; the model
   is an OpenAI-compatible server on loopback that counts the calls it receives.

Usage: ``python -m tools.bench.bench_coordinate [--repeat N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import uvloop
from scipy.optimize import linear_sum_assignment

from tests.helpers import FakeOpenAI, HttpServer
from tierstack.core.values import to_value
from tierstack.server.ai import AIService, CompletionRequest, Message, OpenAICompatibleModel, Scope
from tierstack.server.coordinate import (
    AgentSpec,
    Coordinator,
    Decomposer,
    GoalMemory,
    Need,
    SqliteGoalStore,
    SubtaskSpec,
    Team,
    form_team,
)
from tierstack.v1 import coordinator_service_pb2 as pb
from tierstack.v1 import orchestrator_service_pb2 as orchestrator_pb
from tools.bench.results import Results
from tools.bench.timing import interleaved

CAPABILITIES = ("http", "analysis", "writing", "research", "general")


class InstantProvider:
    """Decomposes every goal into 10 subtasks at once: two chains of five."""

    name = "instant"

    async def decompose(self, goal: str, agents: Sequence[pb.Agent], scope: Scope) -> list[SubtaskSpec]:
        return [
            SubtaskSpec(
                id=f"s{i}",
                description=f"part {i} of {goal}",
                dependencies=(f"s{i - 2}",) if i > 2 else (),
                complexity=1 + i % 4,
                required_capabilities=(CAPABILITIES[i % 3],),
                priority=pb.PRIORITY_MEDIUM,
                tool="core.echo",
                parameters={"value": i},
            )
            for i in range(1, 11)
        ]


class InstantTier2:
    """A Tier 2 whose runs finish at once, with the events a real run sends."""

    def __init__(self) -> None:
        self._steps: dict[str, str] = {}

    async def start_run(self, request: orchestrator_pb.StartRunRequest) -> orchestrator_pb.StartRunResponse:
        run_id = f"r{len(self._steps)}"
        self._steps[run_id] = request.workflow.steps[0].id
        return orchestrator_pb.StartRunResponse(run=orchestrator_pb.Run(run_id=run_id), created=True)

    async def watch_run(self, run_id: str, *, after_sequence: int = 0) -> AsyncIterator[orchestrator_pb.RunEvent]:
        step = self._steps.pop(run_id)
        yield orchestrator_pb.RunEvent(run_id=run_id, sequence=1, run_started=orchestrator_pb.RunStarted())
        yield orchestrator_pb.RunEvent(
            run_id=run_id, sequence=2, step_started=orchestrator_pb.StepStarted(step_id=step)
        )
        completed = orchestrator_pb.StepCompleted(step_id=step, output=to_value(1))
        yield orchestrator_pb.RunEvent(run_id=run_id, sequence=3, step_completed=completed)
        yield orchestrator_pb.RunEvent(run_id=run_id, sequence=4, run_completed=orchestrator_pb.RunCompleted())

    async def get_run(self, run_id: str) -> orchestrator_pb.Run:
        return orchestrator_pb.Run(run_id=run_id, state=orchestrator_pb.RUN_STATE_COMPLETED)

    async def cancel_run(self, run_id: str, *, reason: str = "") -> orchestrator_pb.Run:
        return await self.get_run(run_id)


async def coordinate_overhead(repeat: int, results: Results) -> None:
    tier2 = InstantTier2()
    # A threshold above 1 never reuses a past goal: every goal takes the provider's path.
    decomposer = Decomposer(memory=GoalMemory(), provider=InstantProvider(), threshold=1.1)
    coordinator = Coordinator(tier2, decomposer)
    folder = tempfile.TemporaryDirectory()
    store = SqliteGoalStore(Path(folder.name) / "goals.sqlite3")
    await store.open()
    durable = Coordinator(tier2, decomposer, store=store)  # as the server runs it: SQLite, 10 ms batches
    agents = [pb.Agent(id=f"a{i}", capabilities=CAPABILITIES, max_concurrent_tasks=4) for i in range(4)]
    subtasks = await InstantProvider().decompose("goal", agents, Scope())
    rounds = 0

    async def goal(through: Coordinator = coordinator) -> None:
        nonlocal rounds
        rounds += 1
        request = pb.CoordinateRequest(goal=f"goal {rounds}", agents=agents)
        events = [event async for event in through.coordinate(request)]
        assert events[-1].HasField("goal_completed"), events[-1]

    async def durable_goal() -> None:
        await goal(durable)

    async def bare() -> None:
        for spec in subtasks:  # listed in dependency order already
            workflow = orchestrator_pb.Workflow(steps=[orchestrator_pb.WorkflowStep(id=spec.id, tool=spec.tool)])
            run = (await tier2.start_run(orchestrator_pb.StartRunRequest(workflow=workflow))).run
            async for _ in tier2.watch_run(run.run_id):
                pass

    try:
        samples = await interleaved({"coordinator": goal, "durable": durable_goal, "bare": bare}, repeat)
    finally:
        await durable.close()
        await store.close()
        folder.cleanup()
    durable_ms = statistics.median(samples["durable"]) * 1000
    coordinator_ms = statistics.median(samples["coordinator"]) * 1000
    bare_ms = statistics.median(samples["bare"]) * 1000
    p95 = statistics.quantiles(samples["coordinator"], n=20)[-1] * 1000
    results.samples("coordinate: a 10-subtask goal, provider and Tier 2 answering at once", samples["coordinator"])
    results.compare("Coordinate: ms per 10-subtask goal (vs the bare loop)", coordinator_ms, bare_ms, "ms")
    results.table(
        "Coordinate's overhead: a 10-subtask goal, provider and Tier 2 answering at once",
        ("runner", "median ms per goal", "p95 ms"),
        [
            ("bare loop: the same 10 runs in dependency order", f"{bare_ms:.3f}", ""),
            ("coordinator (decompose, form team, schedule, every event)", f"{coordinator_ms:.3f}", f"{p95:.3f}"),
            ("the same, durable: SQLite goal store, events in 10 ms batches", f"{durable_ms:.3f}", ""),
        ],
        f"Coordinate's own overhead: {coordinator_ms - bare_ms:.3f} ms per goal (goal: under 5 ms).",
    )


def team_formation(repeat: int, results: Results) -> None:
    generator = random.Random(7)
    agents = [
        AgentSpec(
            id=f"a{i}",
            capabilities=frozenset(generator.sample(CAPABILITIES, generator.randint(1, 3))),
            current_load=generator.randint(0, 1),
            max_concurrent_tasks=generator.randint(1, 3),
        )
        for i in range(200)
    ]
    needs = [Need(id=f"s{i}", required_capabilities=frozenset({generator.choice(CAPABILITIES)})) for i in range(200)]
    # The same subtasks as 20 stages of 10, each stage after the whole stage before: an agent may take
    # more than its capacity, as long as it runs no more at once.
    staged = [
        Need(id=need.id, required_capabilities=need.required_capabilities, dependencies=frozenset(_stage(i - 10)))
        for i, need in enumerate(needs)
    ]
    slots = sum(max(a.max_concurrent_tasks - a.current_load, 0) for a in agents)
    matrix = np.random.default_rng(7).random((200, slots))
    samples: dict[str, list[float]] = {"form_team": [], "form_team, 20 stages of 10": []}
    samples["scipy linear_sum_assignment alone, 200 x slots"] = []
    teams: dict[str, object] = {}
    for _ in range(repeat):
        for name, run in (
            ("form_team", functools.partial(form_team, agents, needs)),
            ("form_team, 20 stages of 10", functools.partial(form_team, agents, staged)),
            ("scipy linear_sum_assignment alone, 200 x slots", functools.partial(linear_sum_assignment, matrix)),
        ):
            start = time.perf_counter()
            teams[name] = run()
            samples[name].append(time.perf_counter() - start)
    rows = []
    for name, taken in samples.items():
        p95 = statistics.quantiles(taken, n=20)[-1] * 1000
        team = teams[name]
        assigned = str(len(team.assignments)) if isinstance(team, Team) else ""
        rows.append((name, f"{statistics.median(taken) * 1000:.2f}", f"{p95:.2f}", assigned))
    results.compare(
        "Team formation 200 x 200: ms (vs scipy alone)",
        statistics.median(samples["form_team"]) * 1000,
        statistics.median(samples["scipy linear_sum_assignment alone, 200 x slots"]) * 1000,
        "ms",
    )
    results.table(
        f"Team formation: 200 agents ({slots} free slots) x 200 subtasks, {repeat} rounds",
        ("solver", "median ms", "p95 ms", "subtasks assigned"),
        rows,
        "Staged, an agent may take more subtasks than its capacity, but never run more at once (goal: under 50 ms).",
    )


def _stage(first: int) -> list[str]:
    """Returns the ids of the stage of ten subtasks that starts at ``first`` (none before the first)."""
    return [f"s{i}" for i in range(max(first // 10 * 10, 0), first // 10 * 10 + 10)] if first >= 0 else []


async def calls_saved(results: Results) -> None:
    server = HttpServer()
    fake = FakeOpenAI(server)
    fake.delay = 0.02  # a model that takes 20 ms to answer
    workloads = {
        "100 distinct prompts": [f"summarise report {i}" for i in range(100)],
        "10 prompts, each asked 10 times": [f"summarise report {i % 10}" for i in range(100)],
    }
    for prompts in workloads.values():
        random.Random(3).shuffle(prompts)

    def ask(prompt: str) -> CompletionRequest:
        return CompletionRequest(messages=(Message("user", prompt),), model="tiny")

    async def timed(calls: Sequence[Awaitable[Any]], counted: Callable[[], int]) -> tuple[float, int]:
        before, start = counted(), time.perf_counter()
        await asyncio.gather(*calls)
        return (time.perf_counter() - start) * 1000, counted() - before

    rows = []
    try:
        for name, prompts in workloads.items():
            model = OpenAICompatibleModel(base_url=fake.base_url, model="tiny")
            direct_ms, direct_calls = await timed([model.complete(ask(p)) for p in prompts], lambda: len(fake.requests))
            await model.aclose()
            # A fresh service each time: its cache starts empty, so only sharing calls in flight saves any.
            service = AIService(("tiny",), remote=OpenAICompatibleModel(base_url=fake.base_url, model="tiny"))
            ours_ms, ours_calls = await timed([service.complete(ask(p)) for p in prompts], lambda: len(fake.requests))
            await service.close()
            rows.append((f"completions, {name}", direct_calls, ours_calls, direct_ms, ours_ms))
            results.compare(
                f"Model calls for {name} at once (vs straight to the model)", ours_calls, direct_calls, "calls"
            )
        texts = [f"text number {i}" for i in range(100)]
        model = OpenAICompatibleModel(base_url=fake.base_url, model="tiny")

        def counted() -> int:
            return fake.embed_calls

        direct_ms, direct_calls = await timed([model.embed([t], model="tiny-embed") for t in texts], counted)
        await model.aclose()
        service = AIService(("tiny",), remote=OpenAICompatibleModel(base_url=fake.base_url, model="tiny"))
        ours_ms, ours_calls = await timed([service.embed([t], model="tiny-embed") for t in texts], counted)
        await service.close()
        rows.append(("embeddings, 100 distinct texts", direct_calls, ours_calls, direct_ms, ours_ms))
        results.compare(
            "Embedding calls for 100 texts at once (vs straight to the model)", ours_calls, direct_calls, "calls"
        )
    finally:
        server.close()
    results.table(
        "Model calls saved: 100 concurrent requests, a model answering in 20 ms, no cache hits",
        ("requests", "calls straight", "calls via the AI service", "saved", "wall ms straight", "wall ms via service"),
        [
            (name, direct, ours, f"{1 - ours / direct:.0%}", f"{direct_ms:.0f}", f"{ours_ms:.0f}")
            for name, direct, ours, direct_ms, ours_ms in rows
        ],
        "Different completion requests are never held for each other (a chat completion takes one"
        " conversation): only identical ones in flight share a call. Embedding requests made at once go out"
        " as lists of up to 10. Repeats after the first answer are cache hits, not counted here.",
    )


async def main(repeat: int, results: Results) -> None:
    await coordinate_overhead(repeat, results)
    team_formation(repeat, results)
    await calls_saved(results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=200, help="rounds of the timed parts")
    parser.add_argument("--json", type=Path, help="also write the findings here, for the report")
    arguments = parser.parse_args()
    found = Results()
    uvloop.run(main(arguments.repeat, found))
    found.save(arguments.json)
