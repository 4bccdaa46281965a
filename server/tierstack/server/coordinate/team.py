"""Team formation: subtasks assigned to agents as an optimal assignment problem, an agent's capacity
bounding the subtasks it runs at the same time rather than the subtasks it takes."""

from __future__ import annotations

import graphlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import maximum_bipartite_matching

# A cost no feasible pairing reaches; pairings at this cost are refused after solving.
_INFEASIBLE = 1e9
#: How many assignments the search solves at most before it settles for the best team found.
MAX_SEARCH_NODES = 500


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentSpec:
    """An agent as team formation sees it."""

    id: str
    capabilities: frozenset[str]
    current_load: int = 0
    max_concurrent_tasks: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Need:
    """What one subtask needs from an agent, and the subtasks that must finish before it starts."""

    id: str
    required_capabilities: frozenset[str]
    dependencies: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Team:
    """The chosen assignment: (subtask id, agent id, score) triples, and the subtasks left over."""

    assignments: tuple[tuple[str, str, float], ...]
    unassigned: tuple[str, ...]


class _Order:
    """Which subtasks must end before which others start (the dependencies, followed through), and
    so which can run at the same time."""

    def __init__(self, needs: Sequence[Need]) -> None:
        index = {need.id: row for row, need in enumerate(needs)}
        graph = {row: {index[d] for d in need.dependencies if d in index} for row, need in enumerate(needs)}
        order = list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError
        self.before = np.zeros((len(needs), len(needs)), dtype=bool)  # [u, v]: u ends before v starts
        self.level = np.zeros(len(needs), dtype=np.int64)  # the longest chain of dependencies above each
        for row in order:
            for dependency in graph[row]:
                self.before[:, row] |= self.before[:, dependency]
                self.before[dependency, row] = True
                self.level[row] = max(self.level[row], self.level[dependency] + 1)

    def most_at_once(self, rows: np.ndarray, slots: int) -> int:
        """Returns a bound on how many of ``rows`` an agent running ``slots`` at a time can take: a
        level's subtasks may all run at once, so at most ``slots`` of each."""
        return int(np.minimum(np.bincount(self.level[rows]), slots).sum()) if len(rows) else 0

    def widest(self, rows: Sequence[int]) -> list[int]:
        """Returns the most of ``rows`` that can run at the same time (a largest antichain, by
        Dilworth and König: from a largest matching of the order's bipartite graph)."""
        chosen = np.asarray(rows, dtype=np.int64)
        edges = self.before[np.ix_(chosen, chosen)]
        if not edges.any():
            return list(rows)
        graph = sparse.csr_matrix(edges)
        match = maximum_bipartite_matching(graph, perm_type="column")  # by left vertex: its right one
        partner = np.full(len(chosen), -1)
        partner[match[match >= 0]] = np.flatnonzero(match >= 0)  # by right vertex: its left one
        left = match < 0  # reached by alternating paths from the unmatched left vertices
        right = np.zeros(len(chosen), dtype=bool)
        frontier = np.flatnonzero(left)
        while len(frontier):
            reached = edges[frontier].any(axis=0) & ~right
            right |= reached
            back = partner[np.flatnonzero(reached)]
            back = back[(back >= 0) & ~left[back]]
            left[back] = True
            frontier = back
        return [int(row) for row in chosen[left & ~right]]


def form_team(agents: Sequence[AgentSpec], needs: Sequence[Need], *, max_parallelism: int = 0) -> Team:
    """Assigns each subtask to an agent that has every capability it requires, so that no agent runs
    more subtasks at once than its free capacity (``max_concurrent_tasks - current_load``; a
    negative load counts as none): an agent may take more subtasks than that when they cannot all
    run at the same time, because of their dependencies or because the goal runs at most
    ``max_parallelism`` subtasks at once (0: no bound).

    Covers as many subtasks as any such assignment can and, among those, maximises the total score:
    an agent's n-th subtask scores 1 minus half its load after taking it (``(current_load + n) /
    max_concurrent_tasks``), so work spreads to the least loaded capable agents. Solved exactly:
    the Hungarian method (``scipy.optimize.linear_sum_assignment``) over agent slots, bounded per
    agent by what its capacity allows level by level, and where an agent would then run too many at
    once, branch and bound on the largest set of its subtasks that can (each branch keeps one of
    them from it). The search is exact when it ends; one that passes :data:`MAX_SEARCH_NODES`
    assignments (large teams of small capacities on wide graphs of dependencies) takes the best team
    found, which may cover fewer subtasks than the best one.

    Raises:
        graphlib.CycleError: The dependencies form a cycle.
    """
    if not needs or not agents:
        return Team((), tuple(need.id for need in needs))
    order = _Order(needs)
    search = _Search(agents, needs, order, max_parallelism)
    chosen = search.best()
    return Team(
        tuple((needs[row].id, agents[agent].id, score) for row, (agent, score) in search.scored(chosen)),
        tuple(need.id for row, need in enumerate(needs) if row not in chosen),
    )


class _Search:
    """Branch and bound over assignments: each node forbids some pairings, and solves the rest as an
    assignment problem whose only relaxed rule is how many subtasks an agent runs at once."""

    def __init__(self, agents: Sequence[AgentSpec], needs: Sequence[Need], order: _Order, parallelism: int) -> None:
        # Which agents can take which subtasks, as matrices over the capabilities: an agent fits a
        # subtask when the subtask requires no capability the agent lacks.
        names = {name: index for index, name in enumerate({c for need in needs for c in need.required_capabilities})}
        required = np.zeros((len(needs), len(names)))
        for row, need in enumerate(needs):
            required[row, [names[c] for c in need.required_capabilities]] = 1
        lacking = np.ones((len(agents), len(names)))
        for row, agent in enumerate(agents):
            lacking[row, [names[c] for c in agent.capabilities if c in names]] = 0
        self.fits = required @ lacking.T == 0  # subtasks by agents
        self.capacity = np.array([max(agent.max_concurrent_tasks, 1) for agent in agents], dtype=float)
        self.load = np.array([max(agent.current_load, 0) for agent in agents], dtype=float)
        self.free = np.clip(self.capacity - self.load, 0, None).astype(np.int64)
        at_once = min(parallelism or len(needs), len(needs))
        # An agent whose free capacity is at least the goal's parallelism can never run too many.
        self.bounded = (self.free < at_once) & (self.free > 0)
        self.order = order
        self.nodes = 0
        self.best_value = (-1, -np.inf)
        self.best_choice: dict[int, int] = {}

    def best(self) -> dict[int, int]:
        """Returns the best assignment found: by subtask row, its agent."""
        stack = [np.zeros_like(self.fits)]  # forbidden pairings
        while stack and self.nodes < MAX_SEARCH_NODES:
            forbidden = stack.pop()
            self.nodes += 1
            value, choice = self._relaxed(self.fits & ~forbidden)
            if not _better(value, self.best_value):
                continue  # nothing under this node beats the best team found
            crowded = self._crowded(choice)
            if crowded is None:
                self.best_value, self.best_choice = value, choice
                continue
            if self.best_value[0] < 0:  # a team to fall back on, should the search stop early
                fallbacks = (self._repaired(choice), self._chains())
                self.best_value, self.best_choice = max(
                    ((self._value(team), team) for team in fallbacks), key=lambda found: found[0]
                )
            agent, widest = crowded
            # Some of these cannot all stay with the agent: in each branch one of them leaves it.
            for row in reversed(widest[: self.free[agent] + 1]):
                child = forbidden.copy()
                child[row, agent] = True
                stack.append(child)
        return self.best_choice

    def scored(self, choice: dict[int, int]) -> list[tuple[int, tuple[int, float]]]:
        """Returns the assignment by subtask row with each pairing's score: an agent's n-th subtask
        (in row order) scores by the agent's load after taking it."""
        taken = np.zeros(len(self.free))
        scored = []
        for row, agent in sorted(choice.items()):
            taken[agent] += 1
            scored.append((row, (agent, float(1.0 - 0.5 * (self.load[agent] + taken[agent]) / self.capacity[agent]))))
        return scored

    def _value(self, choice: dict[int, int]) -> tuple[int, float]:
        return len(choice), sum(score for _, (_, score) in self.scored(choice))

    def _repaired(self, choice: dict[int, int]) -> dict[int, int]:
        """Returns ``choice`` with subtasks taken from each agent that would run too many at once, then
        given, one by one, to the best scoring agent that can still run them."""
        rows_of: dict[int, list[int]] = {}
        for row, agent in choice.items():
            rows_of.setdefault(agent, []).append(row)
        for agent, rows in rows_of.items():
            while self.bounded[agent] and len(widest := self.order.widest(rows)) > self.free[agent]:
                rows.remove(widest[-1])
        repaired = {row: agent for agent, rows in rows_of.items() for row in rows}
        for row in range(len(self.fits)):
            if row in repaired:
                continue
            candidates = np.flatnonzero(self.fits[row] & (self.free > 0))
            taken = np.array([len(rows_of.get(int(agent), [])) for agent in candidates])
            for agent in candidates[np.argsort((self.load[candidates] + taken) / self.capacity[candidates])]:
                rows = rows_of.setdefault(int(agent), [])
                if not self.bounded[agent] or len(self.order.widest([*rows, row])) <= self.free[agent]:
                    rows.append(row)
                    repaired[row] = int(agent)
                    break
        return repaired

    def _chains(self) -> dict[int, int]:
        """Returns a team made greedily: each agent that could run too many at once takes, for each
        subtask it may run at a time, the longest chain of subtasks (each after the one before) still
        free that it fits; the other agents share what is left."""
        chosen: dict[int, int] = {}
        topological = np.argsort(self.order.level, kind="stable")
        for agent in sorted(np.flatnonzero(self.bounded), key=lambda a: -self.free[a]):
            for _ in range(self.free[agent]):
                free = [row for row in topological if self.fits[row, agent] and row not in chosen]
                if not free:
                    break
                for row in self._longest_chain(free):
                    chosen[row] = int(agent)
        taken = np.bincount(np.fromiter(chosen.values(), dtype=np.int64), minlength=len(self.free))
        for row in range(len(self.fits)):
            candidates = np.flatnonzero(self.fits[row] & (self.free > 0) & ~self.bounded)
            if row not in chosen and len(candidates):
                agent = candidates[np.argmin((self.load[candidates] + taken[candidates]) / self.capacity[candidates])]
                chosen[row] = int(agent)
                taken[agent] += 1
        return chosen

    def _longest_chain(self, rows: list[int]) -> list[int]:
        """Returns the longest chain among ``rows`` (given in a topological order)."""
        chosen = np.asarray(rows)
        before = self.order.before[np.ix_(chosen, chosen)]
        length = np.ones(len(chosen), dtype=np.int64)
        previous = np.full(len(chosen), -1)
        for at in range(len(chosen)):
            earlier = np.flatnonzero(before[:at, at])
            if len(earlier):
                best = earlier[np.argmax(length[earlier])]
                length[at], previous[at] = length[best] + 1, best
        chain, at = [], int(np.argmax(length))
        while at >= 0:
            chain.append(int(chosen[at]))
            at = int(previous[at])
        return chain[::-1]

    def _crowded(self, choice: dict[int, int]) -> tuple[int, list[int]] | None:
        """Returns an agent that would run more subtasks at once than it may, with the most of its
        subtasks that can run at once; None when every agent keeps within its capacity."""
        taken: dict[int, list[int]] = {}
        for row, agent in choice.items():
            taken.setdefault(agent, []).append(row)
        for agent, rows in sorted(taken.items()):
            if self.bounded[agent] and len(rows) > self.free[agent]:
                widest = self.order.widest(rows)
                if len(widest) > self.free[agent]:
                    return agent, widest
        return None

    def _relaxed(self, fits: np.ndarray) -> tuple[tuple[int, float], dict[int, int]]:
        """Solves the assignment with the pairings ``fits`` allows, each agent taking at most as many
        subtasks as its capacity allows level by level; returns (subtasks covered, total score) and
        the assignment."""
        slots = np.zeros(len(self.free), dtype=np.int64)
        for agent in np.flatnonzero(self.free):
            rows = np.flatnonzero(fits[:, agent])
            slots[agent] = self.order.most_at_once(rows, self.free[agent]) if self.bounded[agent] else len(rows)
        if not slots.sum():
            return (0, 0.0), {}
        owner = np.repeat(np.arange(len(slots)), slots)  # by slot: its agent
        taken = self.load[owner] + np.arange(len(owner)) - np.repeat(np.cumsum(slots) - slots, slots)
        scores = 1.0 - 0.5 * (taken + 1) / self.capacity[owner]
        # A subtask on a slot worse than its n best fitting ones (n subtasks) could move to one of
        # those left free and score more: only those slots can be in an optimal assignment, and they
        # are the first slots of their agents. So columns grow with subtasks squared, hardly with agents.
        keep = np.zeros(len(owner), dtype=bool)
        needs = len(fits)
        for fitting_agents in np.unique(fits, axis=0):
            fitting = fitting_agents[owner]
            candidates = scores[fitting]
            if len(candidates) > needs:
                fitting &= scores >= np.partition(candidates, -needs)[-needs]
            keep |= fitting
        owner, scores = owner[keep], scores[keep]
        allowed = fits[:, owner]
        rows, columns = linear_sum_assignment(np.where(allowed, -scores[np.newaxis, :], _INFEASIBLE))
        chosen = [
            (row, column) for row, column in zip(rows.tolist(), columns.tolist(), strict=True) if allowed[row, column]
        ]
        value = (len(chosen), float(sum(scores[column] for _, column in chosen)))
        return value, {row: int(owner[column]) for row, column in chosen}


def _better(value: tuple[int, float], than: tuple[int, float]) -> bool:
    """Tells whether (subtasks covered, total score) ``value`` beats ``than``, scores within rounding."""
    return value[0] > than[0] or (value[0] == than[0] and value[1] > than[1] + 1e-9)
