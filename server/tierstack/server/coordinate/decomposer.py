"""Goal decomposition in the seed's order: a similar past goal (re-bound to the new goal's
particulars), else a template, else the model; a decomposition whose goal succeeded is learnt for
later goals, and one reused from a past goal that then failed is demoted."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from tierstack.core.values import to_struct
from tierstack.server.ai import Scope
from tierstack.server.coordinate.decompose import SubtaskSpec, check_goal
from tierstack.server.coordinate.memory import GoalMemory
from tierstack.server.coordinate.templates import GoalTemplate
from tierstack.v1 import coordinator_service_pb2 as pb

#: How similar a past goal must be (0..1) for its decomposition to be reused.
DEFAULT_SIMILARITY_THRESHOLD = 0.85


class DecompositionProvider(Protocol):
    """Decomposes what no past goal or template covers: the local rules, or a model."""

    #: Names the provider in answers.
    name: str

    async def decompose(self, goal: str, agents: Sequence[pb.Agent], scope: Scope) -> list[SubtaskSpec]:
        """Returns the subtasks of ``goal``."""
        ...


def subtask_message(spec: SubtaskSpec) -> pb.Subtask:
    """Returns a subtask in its wire form."""
    return pb.Subtask(
        id=spec.id,
        description=spec.description,
        dependencies=spec.dependencies,
        complexity=spec.complexity,
        required_capabilities=spec.required_capabilities,
        priority=spec.priority,
        tool=spec.tool,
        parameters=to_struct(spec.parameters),
    )


class Decomposer:
    """Splits goals into subtasks, cheapest source first.

    Args:
        memory: Learnt decompositions.
        provider: The model that decomposes what nothing else covers.
        templates: Goal templates, tried in order (``templates`` may be replaced later).
        threshold: How similar a past goal must be to be reused.
    """

    def __init__(
        self,
        *,
        memory: GoalMemory,
        provider: DecompositionProvider,
        templates: Sequence[GoalTemplate] = (),
        threshold: float = DEFAULT_SIMILARITY_THRESHOLD,
    ) -> None:
        self._memory = memory
        self.templates = tuple(templates)
        self._provider = provider
        self._threshold = threshold

    async def decompose(self, goal: str, agents: Sequence[pb.Agent], scope: Scope) -> pb.DecomposeGoalResponse:
        """Returns the goal's subtasks and says where they came from.

        A past goal is reused only when it differs from ``goal`` in particulars alone (then its
        subtasks are re-bound to the new particulars) and the agents at hand have every capability
        its subtasks need. Nothing is learnt here: see :meth:`learn`.

        Raises:
            InvalidArgumentError: The goal or the agents are malformed.
            ResourceExhaustedError: A model would be needed and the token budget does not allow it.
            UnavailableError: A model was needed and gave no valid decomposition.
        """
        check_goal(goal, [agent.id for agent in agents])
        capabilities = {capability for agent in agents for capability in agent.capabilities}
        recalled = await self._memory.recall(goal, threshold=self._threshold, capabilities=capabilities)
        if recalled is not None:
            return pb.DecomposeGoalResponse(
                subtasks=recalled.subtasks,
                source=pb.DECOMPOSITION_SOURCE_SIMILAR_GOAL,
                producer=f"similar goal: {recalled.goal}",
                similar_goal=recalled.goal,
                rebound_particulars=recalled.rebound,
            )
        return self._from_template(goal) or pb.DecomposeGoalResponse(
            subtasks=[subtask_message(spec) for spec in await self._provider.decompose(goal, agents, scope)],
            source=pb.DECOMPOSITION_SOURCE_MODEL,
            producer=self._provider.name,
        )

    async def learn(self, goal: str, decomposed: pb.GoalDecomposed, *, succeeded: bool) -> None:
        """Learns from a goal's outcome: the decomposition of a goal that succeeded is kept for later
        goals; a past goal's that was reused and failed is demoted (reused no more until a
        decomposition of that goal succeeds again)."""
        if succeeded:
            await self._memory.learn(goal, decomposed.subtasks)
        elif decomposed.similar_goal:
            await self._memory.demote(decomposed.similar_goal)

    def _from_template(self, goal: str) -> pb.DecomposeGoalResponse | None:
        for template in self.templates:
            subtasks = template.instantiate(goal)
            if subtasks is not None:
                return pb.DecomposeGoalResponse(
                    subtasks=subtasks, source=pb.DECOMPOSITION_SOURCE_TEMPLATE, producer=template.name
                )
        return None
