"""How the work that grows with a request grows: each figure at two sizes, ten times apart.

1. Workflow checks: ``check_workflow`` and the planner on a chain (each step depends on, and reads
   the output of, the one before) and on a wide workflow (every step depends on, and reads, one
   first step), of 1,000 and 10,000 steps (the most one workflow may have).
2. Goal similarity: one search of the character n-gram index after 1,000 and 10,000 learnt goals.
3. Team formation: ``form_team`` for the same agents and subtasks, every agent with room for one
   subtask, then with a capacity of 2^31 - 1.

Each table gives the median milliseconds and the ratio of the larger case to the smaller one:
about 10 is linear, about 100 quadratic; for team formation, about 1 means the capacity numbers
cost nothing.

Usage: ``python -m tools.bench.bench_limits [--repeat N] [--capacity N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop

from tierstack.core.values import to_struct
from tierstack.core.workflow import WorkflowSpec, check_workflow
from tierstack.server.boundary import MAX_TEAM
from tierstack.server.coordinate import AgentSpec, Need, NgramIndex, form_team
from tierstack.server.orchestrate.planner import Planner
from tierstack.v1 import orchestrator_service_pb2 as pb
from tools.bench.results import Results
from tools.bench.timing import timed

SIZES = (1_000, 10_000)
CAPABILITIES = ("http", "analysis", "writing", "research", "general")
WORDS = (
    *("analyze", "fetch", "compare", "summarise", "write", "translate", "report", "sales", "regions"),
    *("teams", "quarterly", "weekly", "numbers", "survey", "market", "memo", "chart", "data", "news"),
    *("manual", "french", "brief", "customers", "churn"),
)


def median_ms(run: Callable[[], Any], repeat: int) -> float:
    """Returns the median milliseconds of ``run()``, after a warm-up call."""
    run()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def chain(size: int) -> pb.Workflow:
    return pb.Workflow(
        name="chain",
        steps=[
            pb.WorkflowStep(
                id=f"s{i}",
                tool="core.echo",
                depends_on=[f"s{i - 1}"] if i else [],
                parameters=to_struct({"value": f"{{{{steps.s{i - 1}.output}}}}" if i else "start"}),
            )
            for i in range(size)
        ],
    )


def wide(size: int) -> pb.Workflow:
    return pb.Workflow(
        name="wide",
        steps=[
            pb.WorkflowStep(
                id=f"s{i}",
                tool="core.echo",
                depends_on=["s0"] if i else [],
                parameters=to_struct({"value": "{{steps.s0.output}}" if i else "start"}),
            )
            for i in range(size)
        ],
    )


def _plan(spec: WorkflowSpec) -> None:
    Planner(lambda _: 0.1).plan(spec)  # a new planner each time: nothing cached


def _ratio(small: float, large: float) -> str:
    return f"{large / small:.1f}" if small else "-"


def workflow_checks(repeat: int, results: Results) -> None:
    rows = []
    for shape, build in (("chain", chain), ("wide", wide)):
        figures = []
        for size in SIZES:
            workflow = build(size)
            spec = check_workflow(workflow)
            check = median_ms(functools.partial(check_workflow, workflow), repeat)
            plan = median_ms(functools.partial(_plan, spec), repeat)
            figures.append((check, plan))
            rows.append((shape, f"{size:,}", f"{workflow.ByteSize() / 1e6:.2f}", f"{check:.1f}", f"{plan:.1f}"))
        (check_1k, plan_1k), (check_10k, plan_10k) = figures
        rows.append((shape, "10k / 1k", "", _ratio(check_1k, check_10k), _ratio(plan_1k, plan_10k)))
        results.compare(f"check_workflow, {shape} of 10k steps: ms (vs 10 x 1k steps)", check_10k, 10 * check_1k, "ms")
    results.table(
        "Workflow checks: chains and wide workflows of 1,000 and 10,000 steps",
        ("workflow", "steps", "MB", "check_workflow ms", "plan ms"),
        rows,
        "A ratio near 10 is linear in the steps.",
    )


async def goal_search(repeat: int, results: Results) -> None:
    generator = random.Random(11)
    query = "analyze the quarterly numbers and compare the teams, then write a memo"
    rows = []
    figures = []
    for size in SIZES:
        index = NgramIndex()
        start = time.perf_counter()
        for i in range(size):  # one at a time, as Coordinate learns them
            await index.add([(f"g{i}", " ".join(generator.choices(WORDS, k=8)) + f" #{i}")])
        learn = (time.perf_counter() - start) / size * 1000
        figures.append(await timed(functools.partial(index.similar, query), repeat) * 1000)
        rows.append((f"{size:,}", f"{learn:.3f}", f"{figures[-1]:.2f}"))
    rows.append(("10k / 1k", "", _ratio(*figures)))
    results.compare("Goal search after 10k goals: ms (vs 10 x after 1k)", figures[1], 10 * figures[0], "ms")
    results.table(
        "Goal similarity (character n-gram TF-IDF): learning goals one at a time, then one search",
        ("goals learnt", "ms per goal learnt", "search ms"),
        rows,
        "A ratio near 10 is linear in the goals.",
    )


def team_formation(repeat: int, capacity: int, results: Results) -> None:
    generator = random.Random(7)
    kinds = [frozenset(generator.sample(CAPABILITIES, generator.randint(1, 3))) for _ in range(100)]
    needs = [Need(id=f"s{i}", required_capabilities=frozenset({generator.choice(CAPABILITIES)})) for i in range(100)]
    rows = []
    figures = []
    for room in (1, capacity):
        agents = [AgentSpec(id=f"a{i}", capabilities=kind, max_concurrent_tasks=room) for i, kind in enumerate(kinds)]
        team = form_team(agents, needs)
        figures.append(median_ms(functools.partial(form_team, agents, needs), repeat))
        rows.append((f"{room:,}", f"{figures[-1]:.2f}", str(len(team.assignments)), str(len(team.unassigned))))
    rows.append((f"{capacity:,} / 1", _ratio(*figures), "", ""))
    results.compare(f"form_team 100 x 100, capacity {capacity:,}: ms (vs capacity 1)", figures[1], figures[0], "ms")
    results.table(
        "Team formation: 100 agents x 100 subtasks, by each agent's capacity",
        ("capacity per agent", "form_team ms", "assigned", "unassigned"),
        rows,
        "A ratio near 1: the capacity numbers cost nothing.",
    )


def team_extremes(repeat: int, capacity: int, results: Results) -> None:
    """The largest team the boundary admits (200 agents, 200 subtasks) in the shapes that cost the
    most: every agent fits every subtask, and each subtask fits only its own agent."""
    size = MAX_TEAM
    shapes = {
        "every agent fits every subtask": (
            [AgentSpec(id=f"a{i}", capabilities=frozenset({"x"}), max_concurrent_tasks=capacity) for i in range(size)],
            [Need(id=f"s{i}", required_capabilities=frozenset({"x"})) for i in range(size)],
        ),
        "each subtask fits only its own agent": (
            [
                AgentSpec(id=f"a{i}", capabilities=frozenset({f"c{i}"}), max_concurrent_tasks=capacity)
                for i in range(size)
            ],
            [Need(id=f"s{i}", required_capabilities=frozenset({f"c{i}"})) for i in range(size)],
        ),
    }
    rows = []
    for shape, (agents, needs) in shapes.items():
        tracemalloc.start()
        team = form_team(agents, needs)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        took = median_ms(functools.partial(form_team, agents, needs), repeat)
        rows.append((shape, f"{took:.1f}", f"{peak:.1f}", str(len(team.assignments))))
    results.table(
        f"Team formation at the boundary's largest team: {size} agents x {size} subtasks, capacity {capacity:,}",
        ("shape", "form_team ms", "peak MiB", "assigned"),
        rows,
        "Each agent gets at most as many slots as subtasks fit it, so memory is bounded by the team's size.",
    )


async def main(repeat: int, capacity: int, results: Results) -> None:
    workflow_checks(repeat, results)
    await goal_search(repeat, results)
    team_formation(repeat, capacity, results)
    team_extremes(repeat, capacity, results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5, help="rounds of each timed part")
    parser.add_argument("--capacity", type=int, default=2**31 - 1, help="the large capacity per agent")
    parser.add_argument("--json", type=Path, help="also write the findings here, for the report")
    arguments = parser.parse_args()
    found = Results()
    uvloop.run(main(arguments.repeat, arguments.capacity, found))
    found.save(arguments.json)
