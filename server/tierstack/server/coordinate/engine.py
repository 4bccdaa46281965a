"""Goal pursuit: decompose, form the team, run each subtask as a Tier 2 run once its dependencies are
done, re-plan failures, report."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import graphlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from tierstack.core.budgets import describe_warning
from tierstack.core.errors import (
    PERMANENT_FAILURES,
    Code,
    InvalidArgumentError,
    NotFoundError,
    TierstackError,
    UnavailableError,
    Violation,
    error_detail,
    error_detail_of_call,
    message_of,
    output_too_large,
    quoted,
)
from tierstack.core.lifecycle import GOAL_LIFECYCLE, Fence, StaleOwnerError
from tierstack.core.templates import references
from tierstack.core.tracing import span
from tierstack.core.values import JSON, from_struct, now_timestamp, to_duration, to_seconds, to_struct
from tierstack.server.ai import Scope
from tierstack.server.auth.keys import Role
from tierstack.server.auth.principal import Principal, act_as, tenant_scope
from tierstack.server.budget import BudgetWarnings, add_usage, left_of, share_of, spent_message, unreserved
from tierstack.server.config import Settings
from tierstack.server.coordinate.decompose import check_goal
from tierstack.server.coordinate.decomposer import Decomposer
from tierstack.server.coordinate.journal import GoalJournal
from tierstack.server.coordinate.store import UNFINISHED, GoalStore, MemoryGoalStore, tenant_of
from tierstack.server.coordinate.team import AgentSpec, Need, Team, form_team
from tierstack.server.metrics import LatencyHistogram
from tierstack.v1 import common_pb2
from tierstack.v1 import coordinator_service_pb2 as pb
from tierstack.v1 import orchestrator_service_pb2 as orchestrator_pb

_log = logging.getLogger(__name__)
_DEFAULTS = Settings()

#: How many subtasks of one goal run at once unless its limits say otherwise.
DEFAULT_PARALLELISM = 8
# How many teams are formed at once, each in a worker thread.
_TEAMS_AT_ONCE = 2
#: How often failed subtasks of one goal are re-planned unless the request says otherwise.
DEFAULT_MAX_REPLANS = 2
#: The longest pause between attempts to reach Tier 2 again, in seconds.
_MAX_BACKOFF = 2.0
# How long a watcher of a goal another replica pursues waits before it reads the store again, unless
# told of a change first.
_WATCH_WAIT = 0.5
#: The most goals one replica takes over at a time from replicas whose leases passed.
_TAKE_OVER_BATCH = 100
_RUN_UNFINISHED = (orchestrator_pb.RUN_STATE_PENDING, orchestrator_pb.RUN_STATE_RUNNING)
_T = TypeVar("_T")
_PRIORITY_ORDER = {pb.PRIORITY_HIGH: 0, pb.PRIORITY_UNSPECIFIED: 1, pb.PRIORITY_MEDIUM: 1, pb.PRIORITY_LOW: 2}


class WorkflowRunner(Protocol):
    """Starts, watches and cancels Tier 2 runs (the Orchestrate client satisfies it)."""

    async def start_run(self, request: orchestrator_pb.StartRunRequest) -> orchestrator_pb.StartRunResponse: ...

    def watch_run(self, run_id: str, *, after_sequence: int = 0) -> AsyncIterator[orchestrator_pb.RunEvent]: ...

    async def get_run(self, run_id: str) -> orchestrator_pb.Run: ...

    async def cancel_run(self, run_id: str, *, reason: str = "") -> orchestrator_pb.Run: ...


_error = functools.partial(error_detail, common_pb2.TIER_COORDINATE)


def _transient(error: TierstackError) -> bool:
    """Says whether a call to Tier 2 failed for now, not because it was wrong: Tier 2 could not be
    reached, or had no room for another carried call just then."""
    return error.code is Code.UNAVAILABLE or error.reason == "TOO_MANY_CALLS"


def team_for(agents: Sequence[pb.Agent], subtasks: Sequence[pb.Subtask], *, max_parallelism: int = 0) -> Team:
    """Forms the best team of ``agents`` for ``subtasks``, of which at most ``max_parallelism`` run at
    once (see :func:`form_team`).

    Raises:
        InvalidArgumentError: The subtasks' dependencies form a cycle.
    """
    try:
        return form_team(
            [
                AgentSpec(
                    id=agent.id,
                    capabilities=frozenset(agent.capabilities),
                    current_load=agent.current_load,
                    max_concurrent_tasks=agent.max_concurrent_tasks,
                )
                for agent in agents
            ],
            [
                Need(
                    id=subtask.id,
                    required_capabilities=frozenset(subtask.required_capabilities),
                    dependencies=frozenset(subtask.dependencies),
                )
                for subtask in subtasks
            ],
            max_parallelism=max_parallelism,
        )
    except graphlib.CycleError as exc:
        cycle = " -> ".join(quoted(str(subtask), 40) for subtask in exc.args[1][:5])
        raise InvalidArgumentError([Violation("subtasks", f"the dependencies form a cycle: {cycle}")]) from None


_RUN_ENDS = frozenset({"run_completed", "run_failed", "run_cancelled"})
# Failures that say nothing of a goal's decomposition: the caller's limits ran out, or a server or
# host was out of reach or broke.
_NOT_THE_PLANS_FAULT = frozenset({"BUDGET_EXHAUSTED", "DEADLINE_EXCEEDED", "INTERNAL", "UNAVAILABLE", "CIRCUIT_OPEN"})


def _run_end(event: orchestrator_pb.RunEvent) -> tuple[bool, common_pb2.ResourceUsage, common_pb2.ErrorDetail | None]:
    """Returns what a run's end says of its subtask: whether it completed, what the run used, and
    its failure."""
    kind = event.WhichOneof("payload")
    if kind == "run_completed":
        return True, event.run_completed.usage, None
    if kind == "run_failed":  # a failed run's attempts are charged too
        return False, event.run_failed.usage, event.run_failed.error
    return False, common_pb2.ResourceUsage(), _error("RUN_CANCELLED", event.run_cancelled.reason)


def _texts_apart(value: JSON, dependencies: set[str], texts: dict[str, JSON]) -> JSON:
    """Returns a subtask's parameters with the text around each reference to a dependency's output
    (``{{inputs.<dependency>…}}``) moved into ``texts`` wherever it holds ``{{``, and replaced by a
    reference to the run input that holds it. A run input reaches the tool as it is, and interpolated
    text is never evaluated again, so nothing else a goal, an agent or a model wrote is evaluated as
    a template."""
    if isinstance(value, str):
        if "{{" not in value:
            return value
        kept = [
            (start, end)
            for start, end, path in references(value)
            if len(path) > 1 and path[0] == "inputs" and path[1] in dependencies
        ]
        pieces, position = [], 0
        for start, end in [*kept, (len(value), len(value))]:
            text = value[position:start]
            if "{{" in text:
                name = next(f"_text{n}" for n in itertools.count() if f"_text{n}" not in dependencies | texts.keys())
                texts[name] = text
                text = f"{{{{inputs.{name}}}}}"
            pieces.append(text + value[start:end])
            position = end
        return "".join(pieces)
    if isinstance(value, dict):
        return {key: _texts_apart(item, dependencies, texts) for key, item in value.items()}
    if isinstance(value, list):
        return [_texts_apart(item, dependencies, texts) for item in value]
    return value


def _no_capable_agent(goal: _Goal, unassigned: Sequence[pb.Subtask]) -> pb.GoalEvent:
    """Returns the failure of a goal whose team leaves ``unassigned`` without an agent, naming each
    subtask and what no agent offers: a capability nobody has, all of them in one agent, or room."""
    agents = [set(agent.capabilities) for agent in goal.request.agents]
    offered = set().union(*agents)

    def why(subtask: pb.Subtask) -> tuple[str, list[str]]:
        needed = list(subtask.required_capabilities)
        missing = sorted(set(needed) - offered)
        named = f"subtask {quoted(subtask.id)}"
        if missing:
            return f"{named} needs {', '.join(map(quoted, missing[:5]))}, which no agent has", missing[:5]
        listed = ", ".join(map(quoted, needed[:5]))
        if not any(set(needed) <= capabilities for capabilities in agents):
            return f"{named} needs {listed} in one agent, and no agent has them all", []
        return f"{named}: every agent with {listed} is full", []

    explained = [why(subtask) for subtask in unassigned[:5]]
    more = f" (and {len(unassigned) - 5} more)" if len(unassigned) > 5 else ""
    message = "; ".join(reason for reason, _ in explained) + more
    return goal.failed("NO_CAPABLE_AGENT", message, subtask=unassigned[0].id, capability=",".join(explained[0][1]))


def team_message(team: Team) -> pb.TeamFormed:
    """Returns a team in its wire form."""
    return pb.TeamFormed(
        assignments=[pb.Assignment(subtask_id=s, agent_id=a, score=score) for s, a, score in team.assignments],
        unassigned_subtask_ids=team.unassigned,
    )


@dataclass(slots=True)
class _Ended:
    """How one run of a subtask ended."""

    subtask_id: str
    output: struct_pb2.Value | None
    usage: common_pb2.ResourceUsage
    error: common_pb2.ErrorDetail | None


@dataclass(slots=True)
class _Attached:
    """A subtask's run that was in flight when the last server stopped: where to watch it from."""

    run_id: str
    after_sequence: int
    limits: common_pb2.ResourceLimits
    #: The run's end (completed, failed or cancelled), when the goal's history holds it already: a
    #: watch from after it would see nothing more.
    ended: orchestrator_pb.RunEvent | None = None


@dataclass(slots=True)
class _Progress:
    """Where a goal stood, read back from its stored events."""

    decomposed: pb.GoalDecomposed | None = None
    subtasks: list[pb.Subtask] | None = None
    agent_of: dict[str, str] = field(default_factory=dict)
    unassigned: bool = False
    outputs: dict[str, struct_pb2.Value] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    in_flight: dict[str, _Attached] = field(default_factory=dict)
    spent: common_pb2.ResourceUsage = field(default_factory=common_pb2.ResourceUsage)
    replans: int = 0
    warned: list[common_pb2.BudgetWarning] = field(default_factory=list)

    @classmethod
    def of(cls, history: Sequence[pb.GoalEvent]) -> _Progress:
        progress = cls()
        for event in history:
            progress._take(event)
        return progress

    def _take(self, event: pb.GoalEvent) -> None:
        kind = event.WhichOneof("payload")
        if kind == "goal_decomposed":
            self.decomposed = event.goal_decomposed
            self.subtasks = list(event.goal_decomposed.subtasks)
        elif kind == "team_formed":
            self.agent_of = {a.subtask_id: a.agent_id for a in event.team_formed.assignments}
            self.unassigned = bool(event.team_formed.unassigned_subtask_ids)
        elif kind == "subtask_started":
            started = event.subtask_started
            self.attempts[started.subtask_id] = self.attempts.get(started.subtask_id, 0) + 1
            self.in_flight[started.subtask_id] = _Attached(started.run_id, 0, started.limits)
        elif kind == "subtask_progress":
            run_event = event.subtask_progress.run_event
            attached = self.in_flight.get(event.subtask_progress.subtask_id)
            if attached is not None and attached.run_id == run_event.run_id:
                attached.after_sequence = run_event.sequence
                if run_event.WhichOneof("payload") in _RUN_ENDS:
                    attached.ended = run_event
        elif kind == "subtask_finished":
            finished = event.subtask_finished
            ran = self.in_flight.pop(finished.subtask_id, None)
            if ran is not None and ran.ended is not None:
                add_usage(self.spent, _run_end(ran.ended)[1])
            if finished.success:
                self.outputs[finished.subtask_id] = finished.output
        elif kind == "subtask_replanned":
            self.agent_of[event.subtask_replanned.subtask_id] = event.subtask_replanned.agent_id
            self.replans = max(self.replans, event.subtask_replanned.replan)
        elif kind == "budget_warning":
            self.warned.append(event.budget_warning)


class _Goal:
    """One goal in pursuit: its id, request and deadline (from its creation, so that it holds across
    restarts)."""

    def __init__(self, goal: pb.Goal) -> None:
        self.request = goal.request
        self.id = goal.goal_id
        self.created = goal.create_time.ToNanoseconds() / 1e9
        seconds = to_seconds(self.request.limits.max_duration) if self.request.limits.HasField("max_duration") else None
        self.deadline = self.created + seconds if seconds else None

    def event(self, **payload: Any) -> pb.GoalEvent:
        """Returns an event of the goal; the store numbers it when it is written."""
        return pb.GoalEvent(
            time=now_timestamp(),
            goal_id=self.id,
            correlation_id=self.request.context.correlation_id,
            **payload,
        )

    def failed(self, reason: str, message: str, **metadata: str) -> pb.GoalEvent:
        return self.event(goal_failed=pb.GoalFailed(error=_error(reason, message, **metadata)))

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.time()

    def elapsed(self) -> float:
        return time.time() - self.created


@dataclass(slots=True)
class _Live:
    """A goal pursued by this server: its journal, its driver and why it is asked to stop."""

    journal: GoalJournal
    task: asyncio.Task[None] | None = None
    cancel_reason: str | None = None


def start_request(request: pb.CoordinateRequest) -> pb.StartGoalRequest:
    """Returns the StartGoal request a Coordinate request stands for."""
    start = pb.StartGoalRequest(
        request_id=request.request_id,
        context=request.context,
        goal=request.goal,
        agents=request.agents,
        limits=request.limits,
    )
    if request.HasField("max_replans"):
        start.max_replans = request.max_replans
    return start


class Coordinator:
    """Turns goals into finished work through Tier 2, keeping each goal in a store so that it outlives
    its caller and this process.

    Args:
        runner: Starts and watches runs (Tier 2).
        decomposer: Splits goals into subtasks.
        store: Where goals and their events are kept; opened and closed by the caller.
        owner: This server's name as the owner of the goals it pursues; unique by default.
        reconnect_backoff: The first pause before watching a run again after Tier 2 could not be
            reached, in seconds; it doubles up to 2 s.
        max_output_bytes: The largest outputs of a goal together (in their wire form); larger ones fail
            the goal with ``OUTPUT_TOO_LARGE``.
        tenant_goals: The most unfinished goals a tenant may have; more are refused with
            ``TOO_MANY_GOALS``. 0 for no limit.
    """

    def __init__(
        self,
        runner: WorkflowRunner,
        decomposer: Decomposer,
        *,
        store: GoalStore | None = None,
        owner: str = "",
        reconnect_backoff: float = 0.05,
        max_output_bytes: int = _DEFAULTS.max_total_output_bytes,
        tenant_goals: int = 0,
    ) -> None:
        self._max_output_bytes = max_output_bytes
        self._tenant_goals = tenant_goals
        self._runner = runner
        self.decomposer = decomposer
        self._store = store if store is not None else MemoryGoalStore()
        self._owner = owner or f"coordinator-{uuid.uuid4().hex}"
        self._backoff = reconnect_backoff
        self._live: dict[str, _Live] = {}
        self._closing = False
        self._keeper: asyncio.Task[None] | None = None
        self.decomposition_latency: dict[str, LatencyHistogram] = {}
        self.team_formation_latency = LatencyHistogram()
        self._forming = asyncio.Semaphore(_TEAMS_AT_ONCE)

    async def form_team(
        self, agents: Sequence[pb.Agent], subtasks: Sequence[pb.Subtask], *, max_parallelism: int
    ) -> Team:
        """Forms the best team (see :func:`team_for`) in a worker thread, a few teams at a time: one
        can take seconds of CPU, and the threads are shared with other work off the loop."""
        async with self._forming:
            return await asyncio.to_thread(team_for, agents, subtasks, max_parallelism=max_parallelism)

    @property
    def active_goals(self) -> int:
        """Counts the goals this server is pursuing."""
        return len(self._live)

    async def open(self) -> None:
        """Takes up the goals no live owner holds: every goal an earlier process left pending or running
        on a store of one process, those whose owner's lease has passed on a shared one. Finished
        subtasks are not run again, and runs in flight are watched again where they were. A goal whose
        events cannot be read back is failed (GOAL_NOT_RESUMABLE) instead, so that nothing stored keeps
        the server from starting. Then keeps its goals' leases and takes over those of owners that died."""
        for goal, fence in await self._store.take_over(self._owner, limit=None, at_start=True):
            await self._adopt(goal, fence)
        self._keeper = asyncio.create_task(self._keep(), name="goal leases")

    async def _adopt(self, goal: pb.Goal, fence: Fence) -> None:
        """Pursues a goal this server has just taken over from its stored events."""
        try:
            history = await self._store.events(goal.goal_id, after_sequence=0)
        except DecodeError:
            _log.warning("the events of goal %s cannot be read; it is failed", goal.goal_id)
            failure = _Goal(goal).failed("GOAL_NOT_RESUMABLE", "the goal cannot be resumed: its events cannot be read")
            goal.error.CopyFrom(failure.goal_failed.error)
            goal.end_time.CopyFrom(failure.time)
            await self._store.write(goal, fence, [failure], transition="fail")
            return
        self._pursue(goal, fence, history, resumed=True)

    async def _keep(self) -> None:
        """Renews the leases of the goals pursued here, stops pursuing those another owner took (and
        all of them once the store has refused renewals for most of a lease, before another replica
        may take them), passes on the requests to cancel them made on other replicas, and takes over
        the goals whose owner's lease has passed; a third of a lease apart, or at once when a request
        arrives."""
        interval = self._store.lease_seconds / 3
        renewed = time.monotonic()
        while True:
            await self._store.wait_changed(f"owner:{self._owner}", interval)
            pursued = dict(self._live)
            try:
                held = await self._store.renew(self._owner, list(pursued))
            except Exception as exc:
                if time.monotonic() - renewed > 2 * interval:
                    _log.warning("the goal store cannot renew this server's leases (%s)", type(exc).__name__)
                    held = set()  # another replica may take them over at any moment: stop first
                else:
                    continue
            else:
                renewed = time.monotonic()
            for goal_id, live in pursued.items():  # goals claimed here since are other objects
                if goal_id not in held and self._live.get(goal_id) is live and live.journal.lost is None:
                    live.journal.lose(StaleOwnerError("goal", goal_id, live.journal.fence))
            try:
                for goal_id, reason in await self._store.take_cancels(self._owner):
                    if (target := self._live.get(goal_id)) is not None:
                        self._request_cancel(target, reason)
                for goal, fence in await self._store.take_over(
                    self._owner, limit=_TAKE_OVER_BATCH, driven=self._live.keys()
                ):
                    _log.info("goal %s taken over: its owner's lease had passed", goal.goal_id)
                    try:
                        await self._adopt(goal, fence)
                    except Exception as exc:  # its lease runs out: it is taken over again later
                        _log.warning("goal %s could not be taken up (%s)", goal.goal_id, type(exc).__name__)
            except Exception as exc:
                _log.warning("the goal store cannot pass on requests or take over goals (%s)", type(exc).__name__)

    def stopping(self) -> None:
        """Marks the process as stopping: goals stay unfinished (to resume on the next start) and
        their runs go on."""
        self._closing = True

    async def close(self) -> None:
        """Stops every goal's driver (the goals stay unfinished, their runs go on) and writes what
        their journals hold."""
        self._closing = True
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        live = list(self._live.values())
        for goal in live:
            if goal.task is not None:
                goal.task.cancel()
        await asyncio.gather(*(goal.task for goal in live if goal.task is not None), return_exceptions=True)

    async def start_goal(self, request: pb.StartGoalRequest) -> tuple[pb.Goal, bool]:
        """Stores a goal and starts pursuing it; returns it and whether this call created it (a
        ``request_id`` already seen returns the goal it started).

        Raises:
            InvalidArgumentError: The goal or the agents are malformed.
        """
        check_goal(request.goal, [agent.id for agent in request.agents])
        goal = pb.Goal(goal_id=uuid.uuid4().hex, state=pb.GOAL_STATE_PENDING, request=request)
        goal.create_time.CopyFrom(now_timestamp())
        # Once stored, a goal is pursued even if this call is cancelled meanwhile.
        return await asyncio.shield(self._create(goal))

    async def _create(self, goal: pb.Goal) -> tuple[pb.Goal, bool]:
        stored, fence = await self._store.create_goal(goal, self._owner, most=self._tenant_goals)
        if fence is None:
            return self._current(stored), False
        self._pursue(stored, fence, [], resumed=False)
        _log.info("goal %s started", goal.goal_id)
        return stored, True

    def _current(self, goal: pb.Goal) -> pb.Goal:
        live = self._live.get(goal.goal_id)
        return live.journal.goal if live is not None else goal

    def _pursue(self, goal: pb.Goal, fence: Fence, history: list[pb.GoalEvent], *, resumed: bool) -> None:
        journal = GoalJournal(self._store, goal, fence, history, on_lost=lambda _: self._lost(live))
        live = self._live[goal.goal_id] = _Live(journal)
        live.task = asyncio.create_task(self._drive(live, resumed=resumed), name=f"goal-{goal.goal_id}")

    @staticmethod
    def _lost(live: _Live) -> None:
        """Stops the driver of a goal another owner took (unless the driver itself found out)."""
        if live.task is not None and live.task is not asyncio.current_task():
            live.task.cancel()

    def _request_cancel(self, live: _Live, reason: str) -> None:
        if live.task is not None and live.cancel_reason is None:
            live.cancel_reason = reason
            live.task.cancel()

    async def get_goal(self, goal_id: str) -> pb.Goal:
        """Returns a goal of the calling tenant; every call that names a goal looks it up here first.

        Raises:
            NotFoundError: No goal of the calling tenant (any, with auth off) has that id.
        """
        tenant = tenant_scope()
        live = self._live.get(goal_id)
        if live is not None and tenant in (None, tenant_of(live.journal.goal)):
            return live.journal.goal
        goal = await self._store.get_goal(goal_id, tenant=tenant)
        if goal is None:
            raise NotFoundError("goal", goal_id)
        return goal

    async def list_goals(self, *, limit: int, after: tuple[int, str] | None, state: int) -> list[pb.Goal]:
        """Returns up to ``limit`` goals of the calling tenant, newest first, older than the cursor ``after``."""
        goals = await self._store.list_goals(limit=limit, after=after, state=state, tenant=tenant_scope())
        return [self._current(goal) for goal in goals]

    async def cancel_goal(self, goal_id: str, reason: str) -> pb.Goal:
        """Cancels a goal and the runs of its subtasks, waits until they have stopped, and returns it.

        Raises:
            NotFoundError: No goal has that id.
            IllegalTransitionError: The goal has ended.
        """
        goal = await self.get_goal(goal_id)
        live = self._live.get(goal_id)
        if live is None or live.task is None or live.journal.feed.ended:
            GOAL_LIFECYCLE.next(goal_id, goal.state, "cancel")
            await self._store.request_cancel(goal_id, reason or "cancelled")  # for the replica pursuing it
            return await self._until_ended(goal_id)
        self._request_cancel(live, reason or "cancelled")
        await asyncio.wait({live.task})
        return live.journal.goal

    async def _until_ended(self, goal_id: str) -> pb.Goal:
        """Waits until a goal another replica pursues has ended, and returns it.

        Raises:
            UnavailableError: It goes on after three leases: neither its owner nor a replica taking it
                over has acted on the request (which stays in the store for whoever pursues it next).
        """
        deadline = time.monotonic() + 3 * self._store.lease_seconds
        while (goal := await self.get_goal(goal_id)).state in UNFINISHED:
            if time.monotonic() > deadline:
                raise UnavailableError(
                    f"goal {goal_id} is pursued by another replica, which has not acted on the request yet",
                    metadata={"goal_id": goal_id},
                )
            await self._store.wait_changed(goal_id, _WATCH_WAIT)
        return goal

    async def watch(self, goal_id: str, *, after_sequence: int = 0) -> AsyncIterator[pb.GoalEvent]:
        """Yields a goal's events after ``after_sequence``: stored history, then live events until
        the goal ends.

        Raises:
            NotFoundError: No goal has that id.
        """
        await self.get_goal(goal_id)
        live = self._live.get(goal_id)
        if live is None:
            while (live := self._live.get(goal_id)) is None:  # another replica pursues it, or none
                goal = await self._store.get_goal(goal_id)  # read first: events stored with its end come after
                for event in await self._store.events(goal_id, after_sequence=after_sequence):
                    after_sequence = event.sequence
                    yield event
                if goal is None or goal.state not in UNFINISHED:
                    return
                await self._store.wait_changed(goal_id, _WATCH_WAIT)
        async for event in live.journal.feed.follow(after_sequence):
            yield event

    async def coordinate(self, request: pb.CoordinateRequest) -> AsyncIterator[pb.GoalEvent]:
        """Starts a goal (or finds the one its ``request_id`` started) and yields its events, with
        every Tier 2 and Tier 3 event inside, until it ends. A caller that leaves early cancels the
        goal only when the request says ``cancel_on_disconnect``.

        Raises:
            InvalidArgumentError: The goal or the agents are malformed.
        """
        goal, _ = await self.start_goal(start_request(request))
        ended = False
        try:
            async for event in self.watch(goal.goal_id):
                yield event
            ended = True
        finally:
            live = self._live.get(goal.goal_id)
            if not ended and request.cancel_on_disconnect and not self._closing and live is not None:
                self._request_cancel(live, "the caller of Coordinate went away")

    async def _drive(self, live: _Live, *, resumed: bool) -> None:
        journal = live.journal
        context = journal.goal.request.context
        if context.tenant_id:  # the goal's calls to Tier 2 are for its tenant and caller, whoever resumed it
            act_as(Principal(context.tenant_id, context.user_id, Role.RUN))
        goal = _Goal(journal.goal)
        pursuit: _Pursuit | None = None
        try:
            progress = _Progress.of(journal.feed.events)
            if journal.goal.state == pb.GOAL_STATE_PENDING:
                await journal.flush(transition="start")
            if resumed:
                finished = len(progress.outputs)
                _log.info("goal %s resumed (%d subtasks finished)", goal.id, finished)
                journal.record(
                    goal.event(goal_resumed=pb.GoalResumed(reason="coordinator restarted", finished_subtasks=finished))
                )
            phases: dict[str, float] = {}
            if progress.subtasks is None:
                await self._decompose(goal, journal, progress, phases)
            if progress.unassigned:
                unassigned = [s for s in progress.subtasks or () if s.id not in progress.agent_of]
                await self._end(journal, _no_capable_agent(goal, unassigned))
                return
            start = time.perf_counter()
            pursuit = _Pursuit(self._runner, goal, progress, self._backoff, self._max_output_bytes)
            async with contextlib.aclosing(pursuit.run()) as events:
                async for event in events:
                    if event.HasField("goal_completed") or event.HasField("goal_failed"):
                        if event.HasField("goal_completed"):
                            phases["execution"] = time.perf_counter() - start
                            for name, seconds in phases.items():
                                event.goal_completed.phase_durations[name].CopyFrom(to_duration(seconds))
                        await self._learn(goal, progress.decomposed, event)
                        await self._end(journal, event)
                        break
                    journal.record(event)
        except asyncio.CancelledError:
            if journal.lost is not None or (self._closing and live.cancel_reason is None):
                raise  # the server stops, or another owner took the goal: it stays unfinished here
            reason = live.cancel_reason or "cancelled"
            await self._give_up(journal, pursuit, goal.event(goal_cancelled=pb.GoalCancelled(reason=reason)))
        except StaleOwnerError:
            pass  # the journal said so; another owner pursues the goal
        except TierstackError as exc:  # what decomposing the goal found
            await self._give_up(journal, pursuit, goal.failed(exc.reason, message_of(exc), **exc.metadata))
        except Exception:
            _log.exception("goal %s crashed", goal.id)
            failure = goal.failed("INTERNAL", "the coordinator failed while pursuing the goal")
            await self._give_up(journal, pursuit, failure)
        finally:
            await journal.close()
            journal.finish()
            if self._live.get(goal.id) is live:  # unless taken up here again since
                del self._live[goal.id]
            _log.info("goal %s is %s", goal.id, pb.GoalState.Name(journal.goal.state))

    async def _decompose(
        self, goal: _Goal, journal: GoalJournal, progress: _Progress, phases: dict[str, float]
    ) -> None:
        request = goal.request
        start = time.perf_counter()
        scope = Scope(tenant=request.context.tenant_id, run=goal.id, token_budget=request.limits.max_tokens or None)
        with span("decompose goal", {"tierstack.goal_id": goal.id}):
            decomposition = await self.decomposer.decompose(request.goal, request.agents, scope)
        phases["decomposition"] = time.perf_counter() - start
        source = pb.DecompositionSource.Name(decomposition.source).removeprefix("DECOMPOSITION_SOURCE_").lower()
        self.decomposition_latency.setdefault(source, LatencyHistogram()).record(phases["decomposition"])
        _log.info("goal %s decomposed into %d subtasks", goal.id, len(decomposition.subtasks))
        decomposed = goal.event(
            goal_decomposed=pb.GoalDecomposed(
                subtasks=decomposition.subtasks,
                source=decomposition.source,
                producer=decomposition.producer,
                similar_goal=decomposition.similar_goal,
                rebound_particulars=decomposition.rebound_particulars,
            )
        )
        start = time.perf_counter()
        with span("form team", {"tierstack.goal_id": goal.id}):
            parallelism = request.limits.max_parallelism or DEFAULT_PARALLELISM
            team = await self.form_team(request.agents, decomposition.subtasks, max_parallelism=parallelism)
        phases["team_formation"] = time.perf_counter() - start
        self.team_formation_latency.record(phases["team_formation"])
        journal.record(decomposed)
        journal.record(goal.event(team_formed=team_message(team)))
        await journal.flush()  # the plan is stored before any of its runs starts, so a resume follows it
        progress.decomposed = decomposed.goal_decomposed
        progress.subtasks = list(decomposition.subtasks)
        progress.agent_of = {s: a for s, a, _ in team.assignments}
        progress.unassigned = bool(team.unassigned)

    async def _learn(self, goal: _Goal, decomposed: pb.GoalDecomposed | None, event: pb.GoalEvent) -> None:
        """Learns from the goal's outcome before it is stored (so a goal resumed after a crash
        learns it again): a failure of the caller's limits says nothing of the decomposition, and a
        memory out of reach only costs later goals a reuse."""
        if decomposed is None or event.goal_failed.error.reason in _NOT_THE_PLANS_FAULT:
            return
        try:
            await self.decomposer.learn(goal.request.goal, decomposed, succeeded=event.HasField("goal_completed"))
        except Exception:
            _log.exception("goal %s: the goal memory could not learn from it", goal.id)

    async def _end(self, journal: GoalJournal, event: pb.GoalEvent) -> None:
        """Ends the goal with ``event`` (its completion, failure or cancellation), in one write."""
        kind = event.WhichOneof("payload")
        goal = journal.goal
        goal.end_time.CopyFrom(event.time)
        if kind == "goal_completed":
            for name, output in event.goal_completed.outputs.items():
                goal.outputs[name].CopyFrom(output)
        elif kind == "goal_failed":
            goal.error.CopyFrom(event.goal_failed.error)
        transition = {"goal_completed": "complete", "goal_failed": "fail", "goal_cancelled": "cancel"}[str(kind)]
        await asyncio.shield(journal.flush(event, transition=transition))

    async def _give_up(self, journal: GoalJournal, pursuit: _Pursuit | None, event: pb.GoalEvent) -> None:
        """Ends a goal that cannot go on: cancels its runs in flight and stores ``event``; a store that
        refuses is logged, as nothing more can be done for the goal here."""
        try:
            if pursuit is not None:
                await pursuit.cancel_runs(f"the goal ended ({event.WhichOneof('payload')})")
            await self._end(journal, event)
        except Exception:
            _log.exception("goal %s could not be ended", journal.goal.goal_id)


class _Pursuit:
    """Runs a goal's subtasks as Tier 2 runs: each once its dependencies are done, the most urgent
    first, within the goal's parallelism and budget; a failed subtask is re-planned (another capable
    agent takes it) while the goal's re-plans last. Subtasks a previous server finished are not run
    again, and the runs it left in flight are watched again, not started again."""

    def __init__(
        self, runner: WorkflowRunner, goal: _Goal, progress: _Progress, backoff: float, max_output_bytes: int
    ) -> None:
        self._max_output_bytes = max_output_bytes
        self._runner = runner
        self._goal = goal
        self._backoff = backoff
        request = goal.request
        subtasks = progress.subtasks or []
        self._order = {s.id: (_PRIORITY_ORDER.get(s.priority, 1), index) for index, s in enumerate(subtasks)}
        self._all = {s.id: s for s in subtasks}
        self._outputs = dict(progress.outputs)
        self._attached = dict(progress.in_flight)
        self._pending = {s.id: s for s in subtasks if s.id not in self._outputs and s.id not in self._attached}
        self._agent_of = dict(progress.agent_of)
        self._attempts = dict(progress.attempts)
        self._spent = common_pb2.ResourceUsage()
        self._spent.CopyFrom(progress.spent)
        self._warnings = BudgetWarnings(request.limits, progress.warned)
        self._reserved: dict[str, common_pb2.ResourceLimits] = {}
        self._parallelism = request.limits.max_parallelism or DEFAULT_PARALLELISM
        self._max_replans = request.max_replans if request.HasField("max_replans") else DEFAULT_MAX_REPLANS
        self._replans = progress.replans
        self._events: asyncio.Queue[pb.GoalEvent | _Ended | Exception] = asyncio.Queue()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._runs: dict[str, str] = {}  # subtask id → the id of its run in flight
        self._failure: pb.GoalEvent | None = None

    async def run(self) -> AsyncGenerator[pb.GoalEvent]:
        goal = self._goal
        try:
            for event in self._warned():  # what the goal crossed while no server pursued it
                yield event
            for subtask_id, attached in self._attached.items():
                self._reserved[subtask_id] = attached.limits
                self._runs[subtask_id] = attached.run_id
                self._tasks[subtask_id] = asyncio.create_task(
                    self._run(self._all[subtask_id], attached.limits, attached)
                )
            failure = self._start_ready()
            while failure is None and self._tasks:
                left = goal.time_left()
                # Woken for the next duration warning too, given here rather than from a timer.
                wake = min((t for t in (left, self._next_warning()) if t is not None), default=None)
                try:
                    item = await asyncio.wait_for(self._events.get(), None if wake is None else max(wake, 0.0))
                except TimeoutError:
                    for event in self._warned():
                        yield event
                    if wake == left:
                        failure = goal.failed("DEADLINE_EXCEEDED", "the goal ran out of time (limits.max_duration)")
                        break
                    continue
                if isinstance(item, Exception):
                    raise item  # a subtask's driver broke: the goal fails as INTERNAL
                if isinstance(item, pb.GoalEvent):
                    yield item
                    continue
                async for event in self._ended(item):
                    yield event
                for event in self._warned():
                    yield event
                failure = self._failure or self._start_ready()
            usage = common_pb2.ResourceUsage()
            usage.CopyFrom(self._spent)
            usage.duration.CopyFrom(to_duration(goal.elapsed()))
            if failure is not None:
                await self.cancel_runs("the goal failed")
                if failure.HasField("goal_failed"):
                    failure.goal_failed.usage.CopyFrom(usage)
                yield failure
                return
            completed = pb.GoalCompleted(outputs=self._outputs, usage=usage)
            if (size := completed.ByteSize()) > self._max_output_bytes:
                # Failed rather than completed: the event would not fit the messages that carry it.
                error = output_too_large(common_pb2.TIER_COORDINATE, "a goal's outputs", size, self._max_output_bytes)
                yield goal.event(goal_failed=pb.GoalFailed(error=error, usage=usage))
                return
            yield goal.event(goal_completed=completed)
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Stops watching the runs in flight; they go on in Tier 2."""
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()

    async def cancel_runs(self, reason: str) -> None:
        """Stops watching the runs in flight and cancels them (one that has ended stays as it is)."""
        await self.stop()
        runs, self._runs = list(self._runs.values()), {}
        cancels = (self._runner.cancel_run(run_id, reason=reason) for run_id in runs)
        await asyncio.gather(*cancels, return_exceptions=True)

    async def _ended(self, ended: _Ended) -> AsyncIterator[pb.GoalEvent]:
        """Takes in one subtask run's end: its output, its usage, or its failure and re-plan."""
        subtask_id = ended.subtask_id
        del self._tasks[subtask_id]
        self._runs.pop(subtask_id, None)
        self._reserved.pop(subtask_id, None)
        add_usage(self._spent, ended.usage)
        if ended.error is None:
            assert ended.output is not None
            self._outputs[subtask_id] = ended.output
            yield self._goal.event(
                subtask_finished=pb.SubtaskFinished(subtask_id=subtask_id, success=True, output=ended.output)
            )
            spent = spent_message(self._goal.request.limits, left_of(self._goal.request.limits, self._spent))
            if spent:
                self._failure = self._goal.failed("BUDGET_EXHAUSTED", f"the goal's {spent}")
            return
        # The failure and what follows it (a re-plan, or the goal's failure) are yielded with no
        # pause between them, so they are stored in one write: a resumed goal finds both or neither.
        yield self._goal.event(
            subtask_finished=pb.SubtaskFinished(subtask_id=subtask_id, success=False, error=ended.error)
        )
        # Another agent runs the same call: a failure the call itself determines would only repeat.
        if self._replans >= self._max_replans or ended.error.reason in PERMANENT_FAILURES:
            error = common_pb2.ErrorDetail()
            error.CopyFrom(ended.error)
            error.metadata["subtask"] = subtask_id
            self._failure = self._goal.event(goal_failed=pb.GoalFailed(error=error))
            return
        self._replans += 1
        previous = self._agent_of[subtask_id]
        subtask = self._all[subtask_id]
        others = [agent for agent in self._goal.request.agents if agent.id != previous]
        team = team_for(others, [subtask])
        self._agent_of[subtask_id] = team.assignments[0][1] if team.assignments else previous
        self._pending[subtask_id] = subtask
        yield self._goal.event(
            subtask_replanned=pb.SubtaskReplanned(
                subtask_id=subtask_id,
                replan=self._replans,
                previous_agent_id=previous,
                agent_id=self._agent_of[subtask_id],
                error=ended.error,
            )
        )

    def _start_ready(self) -> pb.GoalEvent | None:
        """Starts the pending subtasks whose dependencies are done, most urgent first, while there is
        room; returns the goal's failure when its budget is spent."""
        ready = sorted(
            (s for s in self._pending.values() if all(d in self._outputs for d in s.dependencies)),
            key=lambda s: self._order[s.id],
        )
        for subtask in ready[: max(self._parallelism - len(self._tasks), 0)]:
            limits, spent = self._share(subtask)
            if spent:
                return self._goal.failed("BUDGET_EXHAUSTED", f"the goal's {spent}", subtask=subtask.id)
            del self._pending[subtask.id]
            self._reserved[subtask.id] = limits
            self._attempts[subtask.id] = self._attempts.get(subtask.id, 0) + 1
            self._tasks[subtask.id] = asyncio.create_task(self._run(subtask, limits, None))
        return None

    def _share(self, subtask: pb.Subtask) -> tuple[common_pb2.ResourceLimits, str]:
        """Returns a subtask's share of what the goal has left (by complexity among the subtasks not
        yet started), or what is spent."""
        goal_limits = self._goal.request.limits
        left = unreserved(goal_limits, self._spent, self._reserved.values())
        spent = spent_message(goal_limits, left)
        if spent:
            return common_pb2.ResourceLimits(max_depth=goal_limits.max_depth), spent
        weight = max(subtask.complexity, 1) / sum(max(s.complexity, 1) for s in self._pending.values())
        limits = share_of(left, weight)
        limits.max_depth = goal_limits.max_depth
        return limits, ""

    def _warned(self) -> list[pb.GoalEvent]:
        """Returns the budget warnings the goal has earned and not had, as its events."""
        warnings = self._warnings.due(self._spent, self._goal.elapsed())
        for warning in warnings:
            _log.info("goal %s: %s", self._goal.id, describe_warning(warning))
        return [self._goal.event(budget_warning=warning) for warning in warnings]

    def _next_warning(self) -> float | None:
        """Returns the seconds until the goal's next duration warning; None when none is to come."""
        return min((at - self._goal.elapsed() for at in self._warnings.times()), default=None)

    def _start_request(self, subtask: pb.Subtask, limits: common_pb2.ResourceLimits) -> orchestrator_pb.StartRunRequest:
        """Returns the StartRun request of a subtask's current attempt; its request id names the goal,
        the subtask and the attempt, so asking again finds the run instead of starting another."""
        goal = self._goal
        texts: dict[str, JSON] = {}
        dependencies = set(subtask.dependencies)
        parameters = {k: _texts_apart(v, dependencies, texts) for k, v in from_struct(subtask.parameters).items()}
        workflow = orchestrator_pb.Workflow(
            name=f"goal-{goal.id}-{subtask.id}",
            inputs=[orchestrator_pb.WorkflowInput(name=name) for name in (*subtask.dependencies, *texts)],
            steps=[
                orchestrator_pb.WorkflowStep(
                    id=subtask.id, name=subtask.description, tool=subtask.tool, parameters=to_struct(parameters)
                )
            ],
        )
        request = orchestrator_pb.StartRunRequest(
            request_id=f"{goal.id}/{subtask.id}/{self._attempts[subtask.id]}",
            context=goal.request.context,
            workflow=workflow,
            limits=limits,
            inputs=to_struct(texts),
            verbosity=orchestrator_pb.RUN_VERBOSITY_PROGRESS,  # the goal's caller sees its steps' progress
        )
        for dependency in subtask.dependencies:
            request.inputs.fields[dependency].CopyFrom(self._outputs[dependency])
        return request

    async def _reachable(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """Returns what ``call`` answers, asking again (with backoff) while Tier 2 cannot be reached."""
        pause = self._backoff
        while True:
            try:
                return await call()
            except TierstackError as exc:
                if not _transient(exc):
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, _MAX_BACKOFF)

    async def _run(self, subtask: pb.Subtask, limits: common_pb2.ResourceLimits, attached: _Attached | None) -> None:
        """Runs one subtask as a Tier 2 run (or watches again the run a previous server started),
        its dependencies' outputs as inputs, forwarding its events; a dropped stream is watched again
        from the last event seen."""
        goal = self._goal
        output: struct_pb2.Value | None = None
        usage = common_pb2.ResourceUsage()
        error: common_pb2.ErrorDetail | None = None
        finished = False
        attributes = {"tierstack.goal_id": goal.id, "tierstack.agent_id": self._agent_of[subtask.id]}
        try:
            with span(f"subtask {subtask.id}", attributes):
                if attached is None:
                    request = self._start_request(subtask, limits)
                    run = (await self._reachable(lambda: self._runner.start_run(request))).run
                    self._runs[subtask.id] = run.run_id
                    started = pb.SubtaskStarted(
                        subtask_id=subtask.id, agent_id=self._agent_of[subtask.id], run_id=run.run_id
                    )
                    started.limits.CopyFrom(limits)
                    self._events.put_nowait(goal.event(subtask_started=started))
                    run_id, after = run.run_id, 0
                else:
                    run_id, after = attached.run_id, attached.after_sequence
                    if attached.ended is not None:  # it ended before the last server took it in
                        finished, usage, error = _run_end(attached.ended)
                        if finished:
                            output = attached.ended.run_completed.outputs.get(subtask.id)
                pause = self._backoff
                while not finished and error is None:
                    try:
                        async for run_event in self._runner.watch_run(run_id, after_sequence=after):
                            after = run_event.sequence
                            self._events.put_nowait(
                                goal.event(
                                    subtask_progress=pb.SubtaskProgress(subtask_id=subtask.id, run_event=run_event)
                                )
                            )
                            if run_event.HasField("step_completed"):
                                output = run_event.step_completed.output
                            elif run_event.WhichOneof("payload") in _RUN_ENDS:
                                finished, usage, error = _run_end(run_event)
                                # A watch taken up again after the step completed saw no step_completed.
                                if finished and output is None:
                                    output = run_event.run_completed.outputs.get(subtask.id)
                    except TierstackError as exc:
                        if not _transient(exc):
                            raise
                    else:
                        if finished or error is not None:
                            break
                        state = (await self._reachable(lambda: self._runner.get_run(run_id))).state
                        if state not in _RUN_UNFINISHED:
                            break  # paused, or ended with events this watch did not get
                        # the stream ended while the run goes on: Tier 2 is stopping; watch again
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, _MAX_BACKOFF)
        except TierstackError as exc:
            error = error_detail_of_call(exc, common_pb2.TIER_ORCHESTRATE)
        except Exception as exc:
            self._events.put_nowait(exc)
            return
        if error is None and not finished:
            error = _error("RUN_INCOMPLETE", "the run paused, or its stream ended, before it finished")
        self._events.put_nowait(_Ended(subtask.id, output, usage, error))
