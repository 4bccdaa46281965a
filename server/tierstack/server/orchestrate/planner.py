"""The planner: parallel batches, critical path and duration estimate of a workflow."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tierstack.core.workflow import StepSpec, WorkflowSpec
from tierstack.server.auth.principal import scoped
from tierstack.server.bounded import ByteBudgetLRU


@dataclass(frozen=True, slots=True)
class Plan:
    """A workflow's execution plan.

    Attributes:
        batches: Step ids by level; every step depends only on steps of earlier batches.
        max_parallelism: The size of the largest batch.
        critical_path: The step ids of the longest chain by estimated duration.
        estimated_seconds: The estimated duration of that chain.
    """

    batches: tuple[tuple[str, ...], ...]
    max_parallelism: int
    critical_path: tuple[str, ...]
    estimated_seconds: float


def _batches(spec: WorkflowSpec) -> tuple[tuple[str, ...], ...]:
    remaining = {step.id: len(step.depends_on) for step in spec.steps}
    frontier = [step.id for step in spec.steps if not step.depends_on]
    batches: list[tuple[str, ...]] = []
    while frontier:
        batches.append(tuple(frontier))
        following = []
        for step_id in frontier:
            for dependent in spec.dependents[step_id]:
                remaining[dependent] -= 1
                if remaining[dependent] == 0:
                    following.append(dependent)
        frontier = following
    return tuple(batches)


#: What one step id in a cached plan costs beyond its characters: a string object and its place.
_STEP_OVERHEAD = 64


def _size(batches: tuple[tuple[str, ...], ...]) -> int:
    return sum(len(step_id) + _STEP_OVERHEAD for batch in batches for step_id in batch)


class Planner:
    """Plans workflows, caching the batch structure by content hash (an LRU bounded in bytes), so an
    identical workflow is rarely sorted twice; the estimate uses the latest step durations.

    Args:
        estimate: Returns the expected duration in seconds of one step.
        capacity_bytes: How many bytes of plans the cache holds.
    """

    def __init__(self, estimate: Callable[[StepSpec], float], *, capacity_bytes: int = 32 << 20) -> None:
        self._estimate = estimate
        self._cache: ByteBudgetLRU[str, tuple[tuple[str, ...], ...]] = ByteBudgetLRU(capacity_bytes, _size)
        self.hits = 0
        self.misses = 0

    def plan(self, spec: WorkflowSpec) -> tuple[Plan, bool]:
        """Returns the plan of ``spec`` and whether its batches came from the cache."""
        key = scoped(spec.content_hash)  # whether a plan was cached tells of a tenant's own workflows only
        batches = self._cache.get(key)
        cached = batches is not None
        if cached:
            self.hits += 1
        else:
            self.misses += 1
        if batches is None:
            batches = self._cache[key] = _batches(spec)
        finish: dict[str, float] = {}
        via: dict[str, str | None] = {}
        for batch in batches:
            for step_id in batch:
                step = spec.by_id[step_id]
                before = max(step.depends_on, key=lambda d: finish[d], default=None)
                finish[step_id] = (finish[before] if before else 0.0) + self._estimate(step)
                via[step_id] = before
        last = max(finish, key=lambda s: finish[s], default=None)
        path: list[str] = []
        while last is not None:
            path.append(last)
            last = via[last]
        return (
            Plan(
                batches=batches,
                max_parallelism=max((len(b) for b in batches), default=0),
                critical_path=tuple(reversed(path)),
                estimated_seconds=finish[path[0]] if path else 0.0,
            ),
            cached,
        )
