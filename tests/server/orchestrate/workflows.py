"""Builders of wire workflows, runs and events for the tests."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from tierstack.core.values import now_timestamp, to_struct
from tierstack.server.orchestrate import StoredRun
from tierstack.v1 import common_pb2
from tierstack.v1 import orchestrator_service_pb2 as pb


def step(
    step_id: str, tool: str = "core.echo", *, depends_on: tuple[str, ...] = (), **parameters: Any
) -> pb.WorkflowStep:
    return pb.WorkflowStep(id=step_id, tool=tool, depends_on=depends_on, parameters=to_struct(parameters))


def workflow(*steps: pb.WorkflowStep, name: str = "test") -> pb.Workflow:
    return pb.Workflow(name=name, steps=steps)


def new_run(run_id: str, *, request_id: str = "", created_ns: int = 0, state: int = pb.RUN_STATE_PENDING) -> StoredRun:
    run = pb.Run(run_id=run_id, request_id=request_id, state=state)  # type: ignore[arg-type]
    run.create_time.FromNanoseconds(created_ns or now_timestamp().ToNanoseconds())
    return StoredRun(run, workflow(step("a")), common_pb2.ResourceLimits(max_parallelism=3))


def event(run_id: str, sequence: int) -> pb.RunEvent:
    return pb.RunEvent(run_id=run_id, sequence=sequence, run_started=pb.RunStarted(workflow_name=f"w{sequence}"))


@st.composite
def dags(draw: st.DrawFn) -> list[tuple[str, tuple[str, ...]]]:
    """Random DAGs: step i may depend only on steps before it, then the list is shuffled."""
    size = draw(st.integers(min_value=1, max_value=25))
    steps = []
    for index in range(size):
        parents = draw(st.sets(st.integers(min_value=0, max_value=index - 1), max_size=4)) if index else set()
        steps.append((f"s{index}", tuple(f"s{p}" for p in sorted(parents))))
    return draw(st.permutations(steps))
