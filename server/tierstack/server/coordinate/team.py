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
    agent's free capacity (``max_concurrent_tasks - current_load`` subtasks; a negative load counts
    as none), maximising the total score: a pairing scores 1 minus half the agent's utilisation
    after taking it, so work spreads to the least loaded capable agents. Solved exactly with the
    Hungarian method (``scipy.optimize.linear_sum_assignment``) over one column per free agent slot
    that an optimal assignment may use: at most as many per agent as there are subtasks it fits, and
    for each subtask only its best fitting ones. Memory grows with subtasks times agents times
    subtasks at worst, whatever the capacities: the boundary bounds both (200 each).
    """
    if not needs or not agents:
        return Team((), tuple(need.id for need in needs))
    # Which agents can take which subtasks, as matrices over the capabilities: an agent fits a
    # subtask when the subtask requires no capability the agent lacks.
    names = {name: index for index, name in enumerate({c for need in needs for c in need.required_capabilities})}
    required = np.zeros((len(needs), len(names)))
    for row, need in enumerate(needs):
        required[row, [names[c] for c in need.required_capabilities]] = 1
    lacking = np.ones((len(agents), len(names)))
    for row, agent in enumerate(agents):
        lacking[row, [names[c] for c in agent.capabilities if c in names]] = 0
    agents_fitting = required @ lacking.T == 0  # subtasks by agents
    capacity = np.array([max(agent.max_concurrent_tasks, 1) for agent in agents], dtype=float)
    load = np.array([max(agent.current_load, 0) for agent in agents], dtype=float)
    # No agent takes more subtasks than fit it, so later slots would never be chosen: each slot
    # scoring less than the one before, the first ones keep the assignment optimal. So there are at
    # most agents times subtasks slots, whatever the capacities.
    free = np.clip(np.minimum(capacity - load, agents_fitting.sum(axis=0)), 0, None).astype(np.int64)
    if not free.sum():
        return Team((), tuple(need.id for need in needs))
    owner = np.repeat(np.arange(len(agents)), free)  # by slot: its agent
    taken = load[owner] + np.arange(len(owner)) - np.repeat(np.cumsum(free) - free, free)
    scores = 1.0 - 0.5 * (taken + 1) / capacity[owner]
    # A subtask on a slot worse than its n best fitting ones (n subtasks) could move to one of those
    # left free and score more: only those slots can be in an optimal assignment, and they are the
    # first slots of their agents. So columns grow with subtasks squared, hardly with agents.
    keep = np.zeros(len(owner), dtype=bool)
    for fitting_agents in np.unique(agents_fitting, axis=0):
        fitting = fitting_agents[owner]
        candidates = scores[fitting]
        if len(candidates) > len(needs):
            fitting &= scores >= np.partition(candidates, -len(needs))[-len(needs)]
        keep |= fitting
    owner, scores = owner[keep], scores[keep]
    fits = agents_fitting[:, owner]
    cost = np.where(fits, -scores[np.newaxis, :], _INFEASIBLE)
    rows, columns = linear_sum_assignment(cost)
    assigned: dict[int, tuple[str, str, float]] = {}
    for row, column in zip(rows.tolist(), columns.tolist(), strict=True):
        if fits[row, column]:
            assigned[row] = (needs[row].id, agents[owner[column]].id, float(scores[column]))
    return Team(
        tuple(assigned[row] for row in sorted(assigned)),
        tuple(need.id for row, need in enumerate(needs) if row not in assigned),
    )
