"""Builders of wire workflows for the tests."""

from __future__ import annotations

from typing import Any

from tierstack.client.values import to_struct
from tierstack.v1 import orchestrator_service_pb2 as pb


def step(
    step_id: str, tool: str = "core.echo", *, depends_on: tuple[str, ...] = (), **parameters: Any
) -> pb.WorkflowStep:
    return pb.WorkflowStep(id=step_id, tool=tool, depends_on=depends_on, parameters=to_struct(parameters))


def workflow(*steps: pb.WorkflowStep, name: str = "test") -> pb.Workflow:
    return pb.Workflow(name=name, steps=steps)
