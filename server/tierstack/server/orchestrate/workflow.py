"""Workflows as plain values, and the checks that turn a wire workflow into one."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from tierstack.client.values import JSON, from_struct
from tierstack.server.errors import InvalidArgumentError, Violation
from tierstack.server.orchestrate.templates import TemplateError, templates
from tierstack.v1 import common_pb2, orchestrator_service_pb2

#: The most steps one workflow may have.
MAX_STEPS = 10_000

_STEP_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,127}")


@dataclass(frozen=True, slots=True, kw_only=True)
class StepSpec:
    """One checked step of a workflow."""

    id: str
    name: str
    tool: str
    parameters: dict[str, JSON]
    depends_on: tuple[str, ...]
    strategy: common_pb2.Strategy.ValueType
    timeout_seconds: float | None


@dataclass(frozen=True, kw_only=True)
class WorkflowSpec:
    """A checked workflow: unique step ids, known dependencies, no cycle, templates that read
    only from inputs and from the step's own ancestors.

    Attributes:
        name: The workflow's name.
        steps: The steps in their given order.
        content_hash: A hash of the wire form; identical workflows share it.
    """

    name: str
    steps: tuple[StepSpec, ...]
    content_hash: str

    @cached_property
    def by_id(self) -> Mapping[str, StepSpec]:
        """Returns the steps by id."""
        return {step.id: step for step in self.steps}

    @cached_property
    def dependents(self) -> Mapping[str, tuple[str, ...]]:
        """Returns, for each step id, the ids of the steps that depend on it directly."""
        found: dict[str, list[str]] = {step.id: [] for step in self.steps}
        for step in self.steps:
            for dependency in step.depends_on:
                found[dependency].append(step.id)
        return {key: tuple(value) for key, value in found.items()}


def content_hash(workflow: orchestrator_service_pb2.Workflow) -> str:
    """Returns the SHA-256 of the workflow's deterministic wire form."""
    return hashlib.sha256(workflow.SerializeToString(deterministic=True)).hexdigest()


def _find_cycle(edges: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Returns one cycle as a closed list of step ids (first == last), or [] if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for root in edges:
        if root in state:
            continue
        path: list[str] = [root]
        iterators = [iter(edges[root])]
        state[root] = 1
        while iterators:
            child = next(iterators[-1], None)
            if child is None:
                state[path.pop()] = 2
                iterators.pop()
            elif state.get(child) == 1:
                return [*path[path.index(child) :], child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                iterators.append(iter(edges[child]))
    return []


def _ancestors(edges: Mapping[str, tuple[str, ...]]) -> dict[str, set[str]]:
    """Returns every step's transitive dependencies; ``edges`` must be acyclic."""
    found: dict[str, set[str]] = {}

    def visit(step_id: str) -> set[str]:
        if step_id not in found:
            result: set[str] = set()
            stack = list(edges[step_id])
            while stack:
                dependency = stack.pop()
                if dependency not in result:
                    result.add(dependency)
                    stack.extend(edges[dependency])
            found[step_id] = result
        return found[step_id]

    for step_id in edges:
        visit(step_id)
    return found


def check_workflow(workflow: orchestrator_service_pb2.Workflow, *, field: str = "workflow") -> WorkflowSpec:
    """Checks a wire workflow and returns it as a :class:`WorkflowSpec`.

    Raises:
        InvalidArgumentError: With one violation for every problem found, each naming its field.
    """
    violations: list[Violation] = []
    steps_field = f"{field}.steps"
    if not workflow.steps:
        violations.append(Violation(steps_field, "a workflow needs at least one step"))
    if len(workflow.steps) > MAX_STEPS:
        violations.append(Violation(steps_field, f"a workflow may have at most {MAX_STEPS} steps"))
    parameters = [from_struct(step.parameters) for step in workflow.steps]
    first_index: dict[str, int] = {}
    for index, step in enumerate(workflow.steps):
        where = f"{steps_field}[{index}]"
        if not _STEP_ID.fullmatch(step.id):
            violations.append(
                Violation(
                    f"{where}.id",
                    f"{step.id!r} is not a step id (a letter or _, then letters, digits, _ or -)",
                )
            )
        elif step.id in first_index:
            violations.append(Violation(f"{where}.id", f"duplicates the id of steps[{first_index[step.id]}]"))
        else:
            first_index[step.id] = index
        if not step.tool:
            violations.append(Violation(f"{where}.tool", "names no tool"))
    edges: dict[str, tuple[str, ...]] = {}
    for index, step in enumerate(workflow.steps):
        if first_index.get(step.id) != index:
            continue
        known = []
        for position, dependency in enumerate(step.depends_on):
            dep_field = f"{steps_field}[{index}].depends_on[{position}]"
            if dependency == step.id:
                violations.append(Violation(dep_field, f"step {step.id!r} depends on itself"))
            elif dependency not in first_index:
                violations.append(Violation(dep_field, f"unknown step {dependency!r}"))
            else:
                known.append(dependency)
        edges[step.id] = tuple(dict.fromkeys(known))
    cycle = _find_cycle(edges)
    if cycle:
        # Shown in running order: each step must finish before the next one starts.
        violations.append(Violation(steps_field, "dependency cycle: " + " -> ".join(reversed(cycle))))
    else:
        ancestors = _ancestors(edges)
        for step_id, index in first_index.items():
            try:
                for template_field, path in templates(
                    parameters[index], f"{steps_field}[{index}].parameters"
                ):
                    if path[0] == "steps" and path[1] not in ancestors[step_id]:
                        violations.append(
                            Violation(
                                template_field,
                                f"reads the output of {path[1]!r}, not among the step's dependencies",
                            )
                        )
            except TemplateError as exc:
                violations.append(Violation(exc.field, exc.message))
    if violations:
        raise InvalidArgumentError(violations, reason="INVALID_WORKFLOW")
    return WorkflowSpec(
        name=workflow.name,
        content_hash=content_hash(workflow),
        steps=tuple(
            StepSpec(
                id=step.id,
                name=step.name or step.id,
                tool=step.tool,
                parameters=parameters[index],
                depends_on=edges[step.id],
                strategy=step.strategy,
                timeout_seconds=step.timeout.ToNanoseconds() / 1e9
                if step.timeout.ToNanoseconds() > 0
                else None,
            )
            for index, step in enumerate(workflow.steps)
        ),
    )
