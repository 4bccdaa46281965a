"""Team formation: subtasks assigned to agents as an optimal assignment problem."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

# A cost no feasible pairing reaches; pairings at this cost are refused after solving.
_INFEASIBLE = 1e9


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentSpec:
    """An agent as team formation sees it."""

    id: str
    capabilities: frozenset[str]
    current_load: int = 0
    max_concurrent_tasks: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Need:
    """What one subtask needs from an agent."""

    id: str
    required_capabilities: frozenset[str]


@dataclass(frozen=True, slots=True)
class Team:
    """The chosen assignment: (subtask id, agent id, score) triples, and the subtasks left over."""

    assignments: tuple[tuple[str, str, float], ...]
    unassigned: tuple[str, ...]


def form_team(agents: Sequence[AgentSpec], needs: Sequence[Need]) -> Team:
    """Assigns each subtask to an agent that has every capability it requires, within each
    agent's free capacity (``max_concurrent_tasks - current_load`` subtasks), maximising the
    total score: a pairing scores 1 minus half the agent's utilisation after taking it, so work
    spreads to the least loaded capable agents. Solved exactly with the Hungarian method
    (``scipy.optimize.linear_sum_assignment``) over one column per free agent slot.
    """
    slots: list[tuple[AgentSpec, float]] = []
    for agent in agents:
        capacity = max(agent.max_concurrent_tasks, 1)
        for taken in range(agent.current_load, capacity):
            slots.append((agent, 1.0 - 0.5 * (taken + 1) / capacity))
    if not needs or not slots:
        return Team((), tuple(need.id for need in needs))
    # Which slots can take which subtasks, as matrices over the capabilities: a slot fits a subtask
    # when the subtask requires no capability the slot's agent lacks.
    names = {name: index for index, name in enumerate({c for need in needs for c in need.required_capabilities})}
    required = np.zeros((len(needs), len(names)))
    for row, need in enumerate(needs):
        required[row, [names[c] for c in need.required_capabilities]] = 1
    lacking = np.ones((len(slots), len(names)))
    for column, (agent, _) in enumerate(slots):
        lacking[column, [names[c] for c in agent.capabilities if c in names]] = 0
    scores = np.array([score for _, score in slots])
    cost = np.where(required @ lacking.T == 0, -scores[np.newaxis, :], _INFEASIBLE)
    rows, columns = linear_sum_assignment(cost)
    assigned: dict[int, tuple[str, str, float]] = {}
    for row, column in zip(rows.tolist(), columns.tolist(), strict=True):
        if cost[row, column] < _INFEASIBLE:
            agent, score = slots[column]
            assigned[row] = (needs[row].id, agent.id, score)
    return Team(
        tuple(assigned[row] for row in sorted(assigned)),
        tuple(need.id for row, need in enumerate(needs) if row not in assigned),
    )
