"""The local provider's decomposition and optimal team formation, as plain Python."""

from __future__ import annotations

import asyncio
import graphlib
import itertools
import random
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierstack.core.errors import InvalidArgumentError
from tierstack.server.ai import Scope
from tierstack.server.boundary import MAX_TEAM
from tierstack.server.coordinate import AgentSpec, LocalProvider, Need, SubtaskSpec, form_team
from tierstack.v1 import coordinator_service_pb2 as pb


def decompose(goal: str) -> list[SubtaskSpec]:
    return asyncio.run(LocalProvider().decompose(goal, [], Scope()))


def test_stages_become_dependencies_and_parts_run_in_parallel() -> None:
    subtasks = decompose(
        "fetch http://127.0.0.1:8000/a.json and summarize the news, then compare both; finally write a report"
    )
    assert [(s.id, s.description, s.dependencies) for s in subtasks] == [
        ("s1", "fetch http://127.0.0.1:8000/a.json", ()),
        ("s2", "summarize the news", ()),
        ("s3", "compare both", ("s1", "s2")),
        ("s4", "write a report", ("s3",)),
    ]
    fetch, summary, compare, _ = subtasks
    assert (fetch.tool, fetch.parameters, fetch.required_capabilities) == (
        "http.request",
        {"url": "http://127.0.0.1:8000/a.json", "method": "GET"},
        ("http",),
    )
    assert summary.required_capabilities == ("writing",)
    assert compare.required_capabilities == ("analysis",)
    assert compare.parameters["variables"] == {
        "task": "compare both",
        "inputs": {"s1": "{{inputs.s1}}", "s2": "{{inputs.s2}}"},
    }
    assert [s.priority for s in subtasks] == [pb.PRIORITY_HIGH] * 3 + [pb.PRIORITY_MEDIUM]
    assert all(1 <= s.complexity <= 10 for s in subtasks)


def test_numbered_lists_are_stages() -> None:
    subtasks = decompose("1. collect the data\n2. check stock\n3. draft the email")
    assert [(s.description, s.dependencies) for s in subtasks] == [
        ("collect the data", ()),
        ("check stock", ("s1",)),
        ("draft the email", ("s2",)),
    ]


def test_an_empty_goal_is_refused() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        decompose(" ;  then ")
    assert caught.value.violations[0].field == "goal"


def test_a_subtask_nobody_can_do_is_reported() -> None:
    team = form_team(
        [AgentSpec(id="w", capabilities=frozenset({"writing"}), max_concurrent_tasks=3)],
        [
            Need(id="s1", required_capabilities=frozenset({"writing"})),
            Need(id="s2", required_capabilities=frozenset({"http"})),
        ],
    )
    assert [(s, a) for s, a, _ in team.assignments] == [("s1", "w")]
    assert team.unassigned == ("s2",)


def test_work_goes_to_the_least_loaded_capable_agent() -> None:
    team = form_team(
        [
            AgentSpec(id="busy", capabilities=frozenset({"x"}), current_load=3, max_concurrent_tasks=4),
            AgentSpec(id="idle", capabilities=frozenset({"x"}), max_concurrent_tasks=4),
        ],
        [Need(id="s1", required_capabilities=frozenset({"x"}))],
    )
    assert team.assignments[0][1] == "idle"


def test_an_agent_takes_a_chain_longer_than_its_capacity_but_not_as_much_parallel_work() -> None:
    analyst = [AgentSpec(id="analyst", capabilities=frozenset({"analysis"}), max_concurrent_tasks=4)]
    one_after_another = [
        Need(id=f"s{i}", required_capabilities=frozenset({"analysis"}), dependencies=frozenset({f"s{i - 1}"}))
        for i in range(1, 6)
    ]
    assert not form_team(analyst, one_after_another).unassigned  # one of them runs at a time
    side_by_side = [Need(id=f"s{i}", required_capabilities=frozenset({"analysis"})) for i in range(1, 6)]
    assert form_team(analyst, side_by_side).unassigned == ("s5",)  # all five could run at once
    assert not form_team(analyst, side_by_side, max_parallelism=4).unassigned  # the goal runs four at once


def test_agents_that_run_one_subtask_at_a_time_take_the_longest_chains_of_a_wide_forest() -> None:
    """Twenty levels of ten subtasks, each after one of the level before, three chains running
    through all of them: three agents of capacity 1 can take at most one subtask a level each, and
    the chains let them take all sixty (a search too wide to finish still finds them)."""
    generator = random.Random(2)
    needs = [
        Need(
            id=f"t{level}_{place}",
            required_capabilities=frozenset({"x"}),
            dependencies=frozenset({f"t{level - 1}_{place if place < 3 else generator.randrange(10)}"})
            if level
            else frozenset(),
        )
        for level in range(20)
        for place in range(10)
    ]
    team = form_team([AgentSpec(id=f"a{i}", capabilities=frozenset({"x"})) for i in range(3)], needs)
    assert len(team.assignments) == 60
    for agent in ("a0", "a1", "a2"):
        taken = [
            needs_by_id for needs_by_id in needs if (needs_by_id.id, agent) in {(s, a) for s, a, _ in team.assignments}
        ]
        assert _most_at_once(taken, needs, 0) == 1  # one at a time


def test_a_cycle_of_dependencies_is_refused() -> None:
    needs = [
        Need(id="a", required_capabilities=frozenset(), dependencies=frozenset({"b"})),
        Need(id="b", required_capabilities=frozenset(), dependencies=frozenset({"a"})),
    ]
    with pytest.raises(graphlib.CycleError):
        form_team([AgentSpec(id="x", capabilities=frozenset())], needs)


capabilities = st.frozensets(st.sampled_from("abc"), max_size=2)
agents = st.lists(
    st.builds(
        AgentSpec,
        id=st.just(""),
        capabilities=capabilities,
        # A negative load counts as none; a huge capacity gives slots only for the subtasks there are.
        current_load=st.integers(-2, 2) | st.sampled_from([-(2**31), 2**31 - 2]),
        max_concurrent_tasks=st.integers(0, 3) | st.just(2**31 - 1),
    ),
    min_size=1,
    max_size=3,
)
# Each subtask may depend on any before it: every DAG of up to five subtasks.
needs = st.lists(st.tuples(capabilities, st.frozensets(st.integers(0, 4), max_size=3)), min_size=1, max_size=5).map(
    lambda drawn: [
        Need(id=f"s{i}", required_capabilities=c, dependencies=frozenset(f"s{d}" for d in deps if d < i))
        for i, (c, deps) in enumerate(drawn)
    ]
)


def _score(agent: AgentSpec, taken: int) -> float:
    capacity = max(agent.max_concurrent_tasks, 1)
    return 1.0 - 0.5 * (max(agent.current_load, 0) + taken + 1) / capacity


def _before(need_list: list[Need]) -> dict[str, set[str]]:
    """Returns the subtasks that end before each starts (dependencies come first in ``need_list``)."""
    before: dict[str, set[str]] = {}
    for need in need_list:
        before[need.id] = set(need.dependencies).union(*(before[d] for d in need.dependencies))
    return before


def _most_at_once(rows: list[Need], need_list: list[Need], parallelism: int) -> int:
    """Returns how many of ``rows`` can run at the same time, by trying every subset."""
    before = _before(need_list)
    for size in range(len(rows), 0, -1):
        for subset in itertools.combinations(rows, size):
            if all(a.id not in before[b.id] and b.id not in before[a.id] for a, b in itertools.combinations(subset, 2)):
                return min(size, parallelism or size)
    return 0


def _brute_force(agent_list: list[AgentSpec], need_list: list[Need], parallelism: int) -> tuple[int, float]:
    """Returns the most subtasks any feasible assignment covers, and the best total score with that many."""
    best = (0, 0.0)
    for choice in itertools.product([None, *range(len(agent_list))], repeat=len(need_list)):
        taken: list[list[Need]] = [[] for _ in agent_list]
        if any(
            a is not None and not n.required_capabilities <= agent_list[a].capabilities
            for n, a in zip(need_list, choice, strict=True)
        ):
            continue
        for need, agent_index in zip(need_list, choice, strict=True):
            if agent_index is not None:
                taken[agent_index].append(need)
        if any(
            rows
            and _most_at_once(rows, need_list, parallelism)
            > max(agent.max_concurrent_tasks, 1) - max(agent.current_load, 0)
            for agent, rows in zip(agent_list, taken, strict=True)
        ):
            continue
        total = sum(_score(agent, k) for agent, rows in zip(agent_list, taken, strict=True) for k in range(len(rows)))
        best = max(best, (sum(c is not None for c in choice), total))
    return best


@given(agents, needs, st.integers(0, 3))
def test_team_formation_is_feasible_and_optimal(
    agent_list: list[AgentSpec], need_list: list[Need], parallelism: int
) -> None:
    agent_list = [
        AgentSpec(
            id=f"a{i}",
            capabilities=a.capabilities,
            current_load=a.current_load,
            max_concurrent_tasks=a.max_concurrent_tasks,
        )
        for i, a in enumerate(agent_list)
    ]
    team = form_team(agent_list, need_list, max_parallelism=parallelism)
    by_id = {a.id: a for a in agent_list}
    needs_by_id = {n.id: n for n in need_list}
    taken: dict[str, list[Need]] = {a.id: [] for a in agent_list}
    for subtask_id, agent_id, _ in team.assignments:
        assert needs_by_id[subtask_id].required_capabilities <= by_id[agent_id].capabilities
        taken[agent_id].append(needs_by_id[subtask_id])
    for agent_id, rows in taken.items():
        agent = by_id[agent_id]
        free = max(agent.max_concurrent_tasks, 1) - max(agent.current_load, 0)
        assert not rows or _most_at_once(rows, need_list, parallelism) <= free  # never more at once than it may run
    assert sorted([s for s, _, _ in team.assignments] + list(team.unassigned)) == sorted(needs_by_id)
    count, total = _brute_force(agent_list, need_list, parallelism)
    # As many subtasks as any assignment can cover, at the best total score.
    assert len(team.assignments) == count
    assert sum(score for _, _, score in team.assignments) == pytest.approx(total)


def test_many_agents_with_huge_capacities_share_the_work_evenly() -> None:
    agents = [
        AgentSpec(id=f"a{i}", capabilities=frozenset({"x"}), current_load=-(2**31), max_concurrent_tasks=2**31 - 1)
        for i in range(300)
    ]
    team = form_team(agents, [Need(id=f"s{i}", required_capabilities=frozenset({"x"})) for i in range(300)])
    assert sorted(agent for _, agent, _ in team.assignments) == sorted(a.id for a in agents)  # one each
    assert {score for _, _, score in team.assignments} == {1.0 - 0.5 / (2**31 - 1)}


def test_the_largest_team_allowed_stays_small_in_memory_whatever_its_shape() -> None:
    size, capacity = MAX_TEAM, 1_000_000  # the boundary's largest team and capacity
    shapes = [
        ([frozenset({"x"})] * size, [frozenset({"x"})] * size),  # every agent fits every subtask
        ([frozenset({f"c{i}"}) for i in range(size)], [frozenset({f"c{i}"}) for i in range(size)]),  # one each
    ]
    for kinds, needs in shapes:
        agents = [
            AgentSpec(id=f"a{i}", capabilities=kind, max_concurrent_tasks=capacity) for i, kind in enumerate(kinds)
        ]
        tracemalloc.start()
        team = form_team(agents, [Need(id=f"s{i}", required_capabilities=need) for i, need in enumerate(needs)])
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(team.assignments) == size and not team.unassigned
        assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB for one team"


def test_a_goal_of_more_subtasks_than_a_team_may_take_is_refused() -> None:
    goal = " and ".join(f"count item {index}" for index in range(MAX_TEAM + 1))
    with pytest.raises(InvalidArgumentError) as caught:
        asyncio.run(LocalProvider().decompose(goal, [], Scope()))
    assert caught.value.violations[0].field == "goal"
