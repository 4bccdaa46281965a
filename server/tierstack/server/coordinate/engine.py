"""Goal pursuit: decompose, form the team, run each subtask as a Tier 2 run once its dependencies are
done, re-plan failures, report."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf import struct_pb2

from tierstack.client.errors import TierstackError
from tierstack.client.values import now_timestamp, to_duration, to_seconds
from tierstack.server.ai import Scope
from tierstack.server.budget import add_usage, left_of, spent_message
from tierstack.server.config import Settings
from tierstack.server.coordinate.decomposer import Decomposer
from tierstack.server.coordinate.team import AgentSpec, Need, Team, form_team
from tierstack.server.errors import DomainError, error_detail, error_detail_of_call, output_too_large
from tierstack.server.metrics import LatencyHistogram
from tierstack.server.tracing import span
from tierstack.v1 import common_pb2
from tierstack.v1 import coordinator_service_pb2 as pb
from tierstack.v1 import orchestrator_service_pb2 as orchestrator_pb

_log = logging.getLogger(__name__)

#: How many subtasks of one goal run at once unless its limits say otherwise.
DEFAULT_PARALLELISM = 8
#: How often failed subtasks of one goal are re-planned unless the request says otherwise.
DEFAULT_MAX_REPLANS = 2
_PRIORITY_ORDER = {pb.PRIORITY_HIGH: 0, pb.PRIORITY_UNSPECIFIED: 1, pb.PRIORITY_MEDIUM: 1, pb.PRIORITY_LOW: 2}


class WorkflowRunner(Protocol):
    """Runs a workflow in Tier 2 and yields its events (the Orchestrate client satisfies it)."""

    def orchestrate(self, request: orchestrator_pb.OrchestrateRequest) -> AsyncIterator[orchestrator_pb.RunEvent]: ...


_error = functools.partial(error_detail, common_pb2.TIER_COORDINATE)
_DEFAULTS = Settings()


def team_for(agents: Sequence[pb.Agent], subtasks: Sequence[pb.Subtask]) -> Team:
    """Forms the best team of ``agents`` for ``subtasks`` (see :func:`form_team`)."""
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
        [Need(id=subtask.id, required_capabilities=frozenset(subtask.required_capabilities)) for subtask in subtasks],
    )


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


class _Goal:
    """One goal in pursuit: its events, budget and subtasks."""

    def __init__(self, request: pb.CoordinateRequest) -> None:
        self.request = request
        self.id = uuid.uuid4().hex
        self.start = time.perf_counter()
        seconds = to_seconds(request.limits.max_duration) if request.limits.HasField("max_duration") else None
        self.deadline = self.start + seconds if seconds else None

    def event(self, **payload: Any) -> pb.GoalEvent:
        """Returns an event of the goal; it is numbered when it is sent."""
        return pb.GoalEvent(
            time=now_timestamp(),
            goal_id=self.id,
            correlation_id=self.request.context.correlation_id,
            **payload,
        )

    def failed(self, reason: str, message: str, **metadata: str) -> pb.GoalEvent:
        return self.event(goal_failed=pb.GoalFailed(error=_error(reason, message, **metadata)))

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.perf_counter()


class Coordinator:
    """Turns goals into finished work through Tier 2.

    Args:
        runner: Runs workflows (Tier 2).
        decomposer: Splits goals into subtasks.
        max_output_bytes: The largest outputs of a goal together (in their wire form); larger ones fail
            the goal with ``OUTPUT_TOO_LARGE``.
    """

    def __init__(
        self,
        runner: WorkflowRunner,
        decomposer: Decomposer,
        *,
        max_output_bytes: int = _DEFAULTS.max_total_output_bytes,
    ) -> None:
        self._runner = runner
        self._max_output_bytes = max_output_bytes
        self.decomposer = decomposer
        self.decomposition_latency: dict[str, LatencyHistogram] = {}
        self.team_formation_latency = LatencyHistogram()
        self.active_goals = 0

    async def coordinate(self, request: pb.CoordinateRequest) -> AsyncIterator[pb.GoalEvent]:
        """Pursues a goal and yields its events, with every Tier 2 and Tier 3 event inside.

        Raises:
            InvalidArgumentError: The goal or the agents are malformed.
            ResourceExhaustedError: Decomposing needs a model the token budget does not allow.
            UnavailableError: Decomposing needs a model that gave no valid answer.
        """
        goal = _Goal(request)
        sequence = 0
        self.active_goals += 1
        try:
            try:
                async with contextlib.aclosing(self._pursue(goal)) as events:  # a caller leaving stops the runs
                    async for event in events:
                        sequence += 1
                        event.sequence = sequence
                        yield event
            except DomainError:
                raise
            except Exception:  # a fault of ours: the goal ends, its runs are cancelled (closing did it)
                _log.exception("goal %s failed unexpectedly", goal.id)
                failed = goal.failed("INTERNAL", "the coordinator failed while pursuing the goal")
                failed.sequence = sequence + 1
                yield failed
        finally:
            self.active_goals -= 1

    async def _pursue(self, goal: _Goal) -> AsyncGenerator[pb.GoalEvent]:
        request = goal.request
        phases: dict[str, float] = {}
        start = time.perf_counter()
        scope = Scope(tenant=request.context.tenant_id, run=goal.id, token_budget=request.limits.max_tokens or None)
        with span("decompose goal", {"tierstack.goal_id": goal.id}):
            decomposition = await self.decomposer.decompose(request.goal, request.agents, scope)
        phases["decomposition"] = time.perf_counter() - start
        source = pb.DecompositionSource.Name(decomposition.source).removeprefix("DECOMPOSITION_SOURCE_").lower()
        self.decomposition_latency.setdefault(source, LatencyHistogram()).record(phases["decomposition"])
        _log.info("goal %s decomposed into %d subtasks", goal.id, len(decomposition.subtasks))
        yield goal.event(
            goal_decomposed=pb.GoalDecomposed(
                subtasks=decomposition.subtasks, source=decomposition.source, producer=decomposition.producer
            )
        )
        start = time.perf_counter()
        with span("form team", {"tierstack.goal_id": goal.id}):
            team = team_for(request.agents, decomposition.subtasks)
        phases["team_formation"] = time.perf_counter() - start
        self.team_formation_latency.record(phases["team_formation"])
        yield goal.event(team_formed=team_message(team))
        if team.unassigned:
            yield goal.failed(
                "NO_CAPABLE_AGENT",
                "no agent with free capacity has the capabilities of: " + ", ".join(team.unassigned),
            )
            return
        start = time.perf_counter()
        agent_of = {s: a for s, a, _ in team.assignments}
        pursuit = _Pursuit(self._runner, goal, decomposition.subtasks, agent_of, self._max_output_bytes)
        async with contextlib.aclosing(pursuit.run()) as events:
            async for event in events:
                if event.HasField("goal_completed"):
                    phases["execution"] = time.perf_counter() - start
                    for name, seconds in phases.items():
                        event.goal_completed.phase_durations[name].CopyFrom(to_duration(seconds))
                yield event
        _log.info("goal %s %s", goal.id, "completed" if pursuit.completed else "failed")


class _Pursuit:
    """Runs a goal's subtasks as Tier 2 runs: each once its dependencies are done, the most urgent
    first, within the goal's parallelism and budget; a failed subtask is re-planned (another capable
    agent takes it) while the goal's re-plans last."""

    def __init__(
        self,
        runner: WorkflowRunner,
        goal: _Goal,
        subtasks: Sequence[pb.Subtask],
        agent_of: dict[str, str],
        max_output_bytes: int,
    ) -> None:
        self._runner = runner
        self._max_output_bytes = max_output_bytes
        self._goal = goal
        request = goal.request
        self._order = {s.id: (_PRIORITY_ORDER.get(s.priority, 1), index) for index, s in enumerate(subtasks)}
        self._all = {s.id: s for s in subtasks}
        self._pending = dict(self._all)
        self._agent_of = agent_of
        self._outputs: dict[str, struct_pb2.Value] = {}
        self._spent = common_pb2.ResourceUsage()
        self._reserved: dict[str, common_pb2.ResourceLimits] = {}
        self._parallelism = request.limits.max_parallelism or DEFAULT_PARALLELISM
        self._max_replans = request.max_replans if request.HasField("max_replans") else DEFAULT_MAX_REPLANS
        self._replans = 0
        # A subtask's task that fails unexpectedly puts its exception here, for run() to raise.
        self._events: asyncio.Queue[pb.GoalEvent | _Ended | Exception] = asyncio.Queue()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._failure: pb.GoalEvent | None = None
        self.completed = False

    async def run(self) -> AsyncGenerator[pb.GoalEvent]:
        goal = self._goal
        try:
            failure = self._start_ready()
            while failure is None and self._tasks:
                try:
                    item = await asyncio.wait_for(self._events.get(), goal.time_left())
                except TimeoutError:
                    failure = goal.failed("DEADLINE_EXCEEDED", "the goal ran out of time (limits.max_duration)")
                    break
                if isinstance(item, Exception):
                    raise item
                if isinstance(item, pb.GoalEvent):
                    yield item
                    continue
                async for event in self._ended(item):
                    yield event
                failure = self._failure or self._start_ready()
            if failure is not None:
                yield failure
                return
            usage = common_pb2.ResourceUsage()
            usage.CopyFrom(self._spent)
            usage.duration.CopyFrom(to_duration(time.perf_counter() - goal.start))
            completed = pb.GoalCompleted(outputs=self._outputs, usage=usage)
            if (size := completed.ByteSize()) > self._max_output_bytes:
                # Failed rather than completed: the event would not fit the messages that carry it.
                error = output_too_large(common_pb2.TIER_COORDINATE, "a goal's outputs", size, self._max_output_bytes)
                yield goal.event(goal_failed=pb.GoalFailed(error=error))
                return
            self.completed = True
            yield goal.event(goal_completed=completed)
        finally:
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def _ended(self, ended: _Ended) -> AsyncIterator[pb.GoalEvent]:
        """Takes in one subtask run's end: its output, its usage, or its failure and re-plan."""
        subtask_id = ended.subtask_id
        del self._tasks[subtask_id]
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
        yield self._goal.event(
            subtask_finished=pb.SubtaskFinished(subtask_id=subtask_id, success=False, error=ended.error)
        )
        if self._replans >= self._max_replans:
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
            self._tasks[subtask.id] = asyncio.create_task(self._run_reporting(subtask, limits))
        return None

    def _share(self, subtask: pb.Subtask) -> tuple[common_pb2.ResourceLimits, str]:
        """Returns a subtask's share of what the goal has left (by complexity among the subtasks not
        yet started), or what is spent."""
        goal_limits = self._goal.request.limits
        committed = common_pb2.ResourceUsage()
        committed.CopyFrom(self._spent)
        for reserved in self._reserved.values():
            add_usage(
                committed,
                common_pb2.ResourceUsage(
                    credits=reserved.max_credits, tokens=reserved.max_tokens, tool_calls=reserved.max_tool_calls
                ),
            )
        left = left_of(goal_limits, committed)
        limits = common_pb2.ResourceLimits(max_depth=goal_limits.max_depth)
        spent = spent_message(goal_limits, left)
        if spent:
            return limits, spent
        weight = max(subtask.complexity, 1) / sum(max(s.complexity, 1) for s in self._pending.values())
        for name, value in left.items():
            setattr(limits, name, value * weight if name == "max_credits" else max(math.floor(value * weight), 1))
        return limits, ""

    async def _run_reporting(self, subtask: pb.Subtask, limits: common_pb2.ResourceLimits) -> None:
        """Runs one subtask; an unexpected exception goes to the goal, which it ends."""
        try:
            await self._run(subtask, limits)
        except Exception as exc:
            self._events.put_nowait(exc)

    async def _run(self, subtask: pb.Subtask, limits: common_pb2.ResourceLimits) -> None:
        """Runs one subtask as a Tier 2 run, its dependencies' outputs as inputs, forwarding its events."""
        goal = self._goal
        workflow = orchestrator_pb.Workflow(
            name=f"goal-{goal.id}-{subtask.id}",
            inputs=[orchestrator_pb.WorkflowInput(name=dependency) for dependency in subtask.dependencies],
            steps=[
                orchestrator_pb.WorkflowStep(
                    id=subtask.id, name=subtask.description, tool=subtask.tool, parameters=subtask.parameters
                )
            ],
        )
        request = orchestrator_pb.OrchestrateRequest(context=goal.request.context, workflow=workflow, limits=limits)
        for dependency in subtask.dependencies:
            request.inputs.fields[dependency].CopyFrom(self._outputs[dependency])
        output: struct_pb2.Value | None = None
        usage = common_pb2.ResourceUsage()
        error: common_pb2.ErrorDetail | None = None
        finished = False
        attributes = {"tierstack.goal_id": goal.id, "tierstack.agent_id": self._agent_of[subtask.id]}
        try:
            with span(f"subtask {subtask.id}", attributes):
                async for run_event in self._runner.orchestrate(request):
                    kind = run_event.WhichOneof("payload")
                    if kind == "run_started":
                        started = pb.SubtaskStarted(
                            subtask_id=subtask.id, agent_id=self._agent_of[subtask.id], run_id=run_event.run_id
                        )
                        started.limits.CopyFrom(limits)
                        self._events.put_nowait(goal.event(subtask_started=started))
                    self._events.put_nowait(
                        goal.event(subtask_progress=pb.SubtaskProgress(subtask_id=subtask.id, run_event=run_event))
                    )
                    if kind == "step_completed":
                        output = run_event.step_completed.output
                    elif kind == "run_completed":
                        usage, finished = run_event.run_completed.usage, True
                    elif kind == "run_failed":
                        error = run_event.run_failed.error
                    elif kind == "run_cancelled":
                        error = _error("RUN_CANCELLED", run_event.run_cancelled.reason)
        except TierstackError as exc:
            error = error_detail_of_call(exc, common_pb2.TIER_ORCHESTRATE)
        if error is None and not finished:
            error = _error("RUN_INCOMPLETE", "the run paused, or its stream ended, before it finished")
        self._events.put_nowait(_Ended(subtask.id, output, usage, error))
