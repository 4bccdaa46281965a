"""Builders of wire workflows, runs and events for the tests."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from tierstack.core.values import to_struct
from tierstack.v1 import orchestrator_service_pb2 as pb


def step(
    step_id: str, tool: str = "core.echo", *, depends_on: tuple[str, ...] = (), **parameters: Any
) -> pb.WorkflowStep:
    return pb.WorkflowStep(id=step_id, tool=tool, depends_on=depends_on, parameters=to_struct(parameters))


def workflow(*steps: pb.WorkflowStep, name: str = "test") -> pb.Workflow:
    return pb.Workflow(name=name, steps=steps)


@st.composite
def dags(draw: st.DrawFn) -> list[tuple[str, tuple[str, ...]]]:
    """Random DAGs: step i may depend only on steps before it, then the list is shuffled."""
    size = draw(st.integers(min_value=1, max_value=25))
    steps = []
    for index in range(size):
        parents = draw(st.sets(st.integers(min_value=0, max_value=index - 1), max_size=4)) if index else set()
        steps.append((f"s{index}", tuple(f"s{p}" for p in sorted(parents))))
    return draw(st.permutations(steps))
