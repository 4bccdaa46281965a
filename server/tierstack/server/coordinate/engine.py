"""Goal pursuit: decompose, form the team, run the subtasks as a Tier 2 workflow, report."""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from tierstack.client.errors import TierstackError
from tierstack.client.values import now_timestamp, to_duration
from tierstack.server.coordinate.decomposer import Decomposer
from tierstack.server.coordinate.team import AgentSpec, Need, Team, form_team
from tierstack.server.errors import error_detail, error_detail_of_call
from tierstack.v1 import common_pb2
from tierstack.v1 import coordinator_service_pb2 as pb
from tierstack.v1 import orchestrator_service_pb2 as orchestrator_pb

_log = logging.getLogger(__name__)
_STEP_PAYLOADS = ("step_started", "step_execution", "step_completed", "step_failed", "step_skipped", "step_retried")


class WorkflowRunner(Protocol):
    """Runs a workflow in Tier 2 and yields its events (the Orchestrate client satisfies it)."""

    def orchestrate(self, request: orchestrator_pb.OrchestrateRequest) -> AsyncIterator[orchestrator_pb.RunEvent]: ...


_error = functools.partial(error_detail, common_pb2.TIER_COORDINATE)


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


class Coordinator:
    """Turns goals into finished work through Tier 2.

    Args:
        runner: Runs workflows (Tier 2).
        decomposer: Splits goals into subtasks.
    """

    def __init__(self, runner: WorkflowRunner, decomposer: Decomposer) -> None:
        self._runner = runner
        self.decomposer = decomposer

    async def coordinate(self, request: pb.CoordinateRequest) -> AsyncIterator[pb.GoalEvent]:
        """Pursues a goal and yields its events, with every Tier 2 and Tier 3 event inside.

        Raises:
            InvalidArgumentError: The goal or the agents are malformed.
        """
        goal_id = uuid.uuid4().hex
        sequence = 0

        def event(**payload: Any) -> pb.GoalEvent:
            nonlocal sequence
            sequence += 1
            return pb.GoalEvent(
                sequence=sequence,
                time=now_timestamp(),
                goal_id=goal_id,
                correlation_id=request.context.correlation_id,
                **payload,
            )

        phases: dict[str, float] = {}
        start = time.perf_counter()
        decomposition = await self.decomposer.decompose(request.goal, request.agents)
        phases["decomposition"] = time.perf_counter() - start
        _log.info("goal %s decomposed into %d subtasks", goal_id, len(decomposition.subtasks))
        yield event(
            goal_decomposed=pb.GoalDecomposed(
                subtasks=decomposition.subtasks, source=decomposition.source, producer=decomposition.producer
            )
        )
        start = time.perf_counter()
        team = team_for(request.agents, decomposition.subtasks)
        phases["team_formation"] = time.perf_counter() - start
        yield event(team_formed=team_message(team))
        if team.unassigned:
            yield event(
                goal_failed=pb.GoalFailed(
                    error=_error(
                        "NO_CAPABLE_AGENT",
                        "no agent with free capacity has the capabilities of: " + ", ".join(team.unassigned),
                    )
                )
            )
            return
        agent_of = {subtask: agent for subtask, agent, _ in team.assignments}
        workflow = orchestrator_pb.Workflow(
            name=f"goal-{goal_id}",
            steps=[
                orchestrator_pb.WorkflowStep(
                    id=subtask.id,
                    name=subtask.description,
                    tool=subtask.tool,
                    parameters=subtask.parameters,
                    depends_on=subtask.dependencies,
                )
                for subtask in decomposition.subtasks
            ],
        )
        start = time.perf_counter()
        outcome: pb.GoalEvent | None = None
        try:
            async for run_event in self._runner.orchestrate(
                orchestrator_pb.OrchestrateRequest(context=request.context, workflow=workflow, limits=request.limits)
            ):
                kind = run_event.WhichOneof("payload")
                step_id = getattr(run_event, kind).step_id if kind in _STEP_PAYLOADS else ""
                if kind == "step_started":
                    yield event(
                        subtask_started=pb.SubtaskStarted(
                            subtask_id=step_id, agent_id=agent_of[step_id], run_id=run_event.run_id
                        )
                    )
                yield event(subtask_progress=pb.SubtaskProgress(subtask_id=step_id, run_event=run_event))
                if kind == "step_completed":
                    done = pb.SubtaskFinished(subtask_id=step_id, success=True, output=run_event.step_completed.output)
                    yield event(subtask_finished=done)
                elif kind == "step_failed":
                    failed = pb.SubtaskFinished(subtask_id=step_id, success=False, error=run_event.step_failed.error)
                    yield event(subtask_finished=failed)
                elif kind == "run_completed":
                    phases["execution"] = time.perf_counter() - start
                    completed = run_event.run_completed
                    outcome = event(
                        goal_completed=pb.GoalCompleted(
                            outputs=completed.outputs,
                            usage=completed.usage,
                            phase_durations={name: to_duration(seconds) for name, seconds in phases.items()},
                        )
                    )
                elif kind == "run_failed":
                    outcome = event(goal_failed=pb.GoalFailed(error=run_event.run_failed.error))
                elif kind == "run_cancelled":
                    reason = run_event.run_cancelled.reason
                    outcome = event(goal_failed=pb.GoalFailed(error=_error("RUN_CANCELLED", reason)))
        except TierstackError as exc:
            failure = error_detail_of_call(exc, common_pb2.TIER_ORCHESTRATE)
            outcome = event(goal_failed=pb.GoalFailed(error=failure))
        outcome = outcome or event(
            goal_failed=pb.GoalFailed(
                error=_error("RUN_INCOMPLETE", "the run paused, or its stream ended, before it finished")
            )
        )
        _log.info("goal %s %s", goal_id, "completed" if outcome.HasField("goal_completed") else "failed")
        yield outcome
