"""Lifecycles as explicit state machines, and the fence that gives every resource one owner.

A lifecycle is a table of (state, event) → next state, in the manner of h11's ``_state.py``: what is
not in the table cannot happen. Stores apply each transition as a compare-and-set: the state the
writer expects, its owner id and its epoch are checked in the same write that changes the state, so
a writer that lost its ownership (a newer owner claimed the resource, raising the epoch) or that
believes a state the resource left is refused with a clear error instead of overwriting it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from tierstack.core.errors import FailedPreconditionError
from tierstack.v1 import coordinator_service_pb2 as coordinator_pb
from tierstack.v1 import orchestrator_service_pb2 as orchestrator_pb

#: How long a claim holds a resource without being renewed, unless a store is told otherwise.
DEFAULT_LEASE_SECONDS = 10.0


def lease_end(seconds: float) -> int:
    """Returns when a lease taken now for ``seconds`` ends, in ns since the epoch."""
    return time.time_ns() + int(seconds * 1e9)


@dataclass(frozen=True, slots=True)
class Fence:
    """Who may write a resource: its owner and the epoch of that ownership (raised by each claim)."""

    owner: str
    epoch: int


class StaleOwnerError(FailedPreconditionError):
    """A write came from an owner that no longer holds the resource; nothing was written."""

    default_reason = "STALE_OWNER"

    def __init__(self, kind: str, resource_id: str, fence: Fence) -> None:
        super().__init__(
            f"{kind} {resource_id} is no longer owned by this writer (epoch {fence.epoch}); the write is refused",
            metadata={f"{kind}_id": resource_id, "epoch": str(fence.epoch)},
        )


class IllegalTransitionError(FailedPreconditionError):
    """An event does not apply to the resource in its current state."""

    default_reason = "ILLEGAL_TRANSITION"


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """One kind of resource's states and the events that move it between them.

    Args:
        kind: The resource's name in errors, such as ``goal``.
        names: Each state's name, for errors.
        table: The next state for each (state, event) that may happen.
    """

    kind: str
    names: Mapping[int, str]
    table: Mapping[tuple[int, str], int]

    def next(self, resource_id: str, state: int, event: str) -> int:
        """Returns the state that ``event`` moves a resource in ``state`` to.

        Raises:
            IllegalTransitionError: The table has no such move.
        """
        following = self.table.get((state, event))
        if following is None:
            raise IllegalTransitionError(
                f"{self.kind} {resource_id} is {self.names.get(state, state)}: it cannot {event}",
                metadata={f"{self.kind}_id": resource_id, "state": str(self.names.get(state, state)), "event": event},
            )
        return following

    def follows(self, source: int, target: int) -> bool:
        """Says whether a resource in ``source`` may be written in ``target``: the same state, or one
        an event of the table leads to."""
        return source == target or any(
            start == source and following == target for (start, _), following in self.table.items()
        )

    def is_final(self, state: int) -> bool:
        """Says whether no event moves a resource out of ``state``."""
        return not any(source == state for source, _ in self.table)


_G = coordinator_pb
#: A goal is created PENDING; ``claim`` is a new owner taking it up (same state, a higher epoch).
GOAL_LIFECYCLE = Lifecycle(
    kind="goal",
    names={value: _G.GoalState.Name(value).removeprefix("GOAL_STATE_") for value in _G.GoalState.values()},
    table={
        (_G.GOAL_STATE_PENDING, "claim"): _G.GOAL_STATE_PENDING,
        (_G.GOAL_STATE_PENDING, "start"): _G.GOAL_STATE_RUNNING,
        (_G.GOAL_STATE_PENDING, "fail"): _G.GOAL_STATE_FAILED,
        (_G.GOAL_STATE_PENDING, "cancel"): _G.GOAL_STATE_CANCELLED,
        (_G.GOAL_STATE_RUNNING, "claim"): _G.GOAL_STATE_RUNNING,
        (_G.GOAL_STATE_RUNNING, "complete"): _G.GOAL_STATE_COMPLETED,
        (_G.GOAL_STATE_RUNNING, "fail"): _G.GOAL_STATE_FAILED,
        (_G.GOAL_STATE_RUNNING, "cancel"): _G.GOAL_STATE_CANCELLED,
    },
)

_R = orchestrator_pb
#: A run is created PENDING by its first owner; ``claim`` is a new owner taking it up after its owner
#: stopped (same state, a higher epoch); ``resume`` takes up a paused run.
RUN_LIFECYCLE = Lifecycle(
    kind="run",
    names={value: _R.RunState.Name(value).removeprefix("RUN_STATE_") for value in _R.RunState.values()},
    table={
        (_R.RUN_STATE_PENDING, "claim"): _R.RUN_STATE_PENDING,
        (_R.RUN_STATE_PENDING, "start"): _R.RUN_STATE_RUNNING,
        (_R.RUN_STATE_PENDING, "fail"): _R.RUN_STATE_FAILED,
        (_R.RUN_STATE_PENDING, "cancel"): _R.RUN_STATE_CANCELLED,
        (_R.RUN_STATE_RUNNING, "claim"): _R.RUN_STATE_RUNNING,
        (_R.RUN_STATE_RUNNING, "pause"): _R.RUN_STATE_PAUSED,
        (_R.RUN_STATE_RUNNING, "complete"): _R.RUN_STATE_COMPLETED,
        (_R.RUN_STATE_RUNNING, "fail"): _R.RUN_STATE_FAILED,
        (_R.RUN_STATE_RUNNING, "cancel"): _R.RUN_STATE_CANCELLED,
        (_R.RUN_STATE_PAUSED, "resume"): _R.RUN_STATE_RUNNING,
        (_R.RUN_STATE_PAUSED, "cancel"): _R.RUN_STATE_CANCELLED,
    },
)
