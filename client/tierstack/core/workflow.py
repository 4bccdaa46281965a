"""Workflows as plain values, and the checks that turn a wire workflow into one."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError

from tierstack.core.errors import InvalidArgumentError, Violation, brief, quoted
from tierstack.core.templates import Path, TemplateError, templates
from tierstack.core.values import JSON, from_struct, from_value, to_seconds
from tierstack.v1 import common_pb2, orchestrator_service_pb2

pb = orchestrator_service_pb2

#: How deeply workflows may nest unless a run's limits say otherwise.
DEFAULT_MAX_DEPTH = 5

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,127}")
_STEP_REFERENCE = re.compile(r"\bsteps\.([A-Za-z_][A-Za-z0-9_-]*)")
_VARIABLE_REFERENCE = re.compile(r"\bvars\.([A-Za-z_][A-Za-z0-9_-]*)")
_TYPE_CHECKS: dict[int, tuple[str, Any]] = {
    pb.INPUT_TYPE_STRING: ("a string", lambda v: isinstance(v, str)),
    pb.INPUT_TYPE_NUMBER: ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)),
    pb.INPUT_TYPE_INTEGER: ("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    pb.INPUT_TYPE_BOOLEAN: ("true or false", lambda v: isinstance(v, bool)),
    pb.INPUT_TYPE_OBJECT: ("an object", lambda v: isinstance(v, dict)),
    pb.INPUT_TYPE_ARRAY: ("an array", lambda v: isinstance(v, list)),
}
_MISSING: Any = object()
# The most step names a violation lists; the rest are counted.
_LISTED_NAMES = 10


# A condition is evaluated in the orchestrator, so it may only select and compare what is there: a
# list or object it builds ([a, b], {k: v}) can copy data many times over, each level multiplying.
_BUILDERS = frozenset({"multi_select_list", "multi_select_dict"})
_BUILDS = "a `when` condition may not build lists or objects ([a, b], {k: v}); it selects and compares"


def _builds(node: Any) -> bool:
    """Says whether a parsed JMESPath expression builds lists or objects (without recursion)."""
    pending = [node]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if item.get("type") in _BUILDERS:
                return True
            pending.extend(item.get("children", ()))
    return False


def _shown(value: JSON) -> str:
    """Returns a short prefix of a caller's value for a violation."""
    return quoted(value if isinstance(value, str) else json.dumps(value))


@dataclass(frozen=True, slots=True)
class InputSpec:
    """One declared input: its type, and its default unless it has none."""

    name: str
    type: int
    default: JSON = _MISSING
    required: bool = False


@dataclass(frozen=True, slots=True)
class RetrySpec:
    """How a failed step is tried again: exponential backoff with full jitter."""

    max_attempts: int = 1
    initial_seconds: float = 1.0
    multiplier: float = 2.0
    max_seconds: float = 60.0

    def backoff(self, failed_attempt: int) -> float:
        """Returns the wait after attempt ``failed_attempt`` (from 1): uniform in [0, cap]."""
        cap = min(self.max_seconds, self.initial_seconds * self.multiplier ** (failed_attempt - 1))
        return random.uniform(0, cap)


@dataclass(frozen=True, slots=True, kw_only=True)
class StepSpec:
    """One checked step of a workflow: a tool call or a nested workflow."""

    id: str
    name: str
    tool: str
    parameters: dict[str, JSON]
    depends_on: tuple[str, ...]
    strategy: common_pb2.Strategy.ValueType
    timeout_seconds: float | None
    workflow: WorkflowSpec | None = None
    retry: RetrySpec = field(default_factory=RetrySpec)
    when: Any = None  # a compiled JMESPath expression
    optional: bool = False
    prompt: str = ""


@dataclass(frozen=True, kw_only=True)
class WorkflowSpec:
    """A checked workflow: unique step ids, known dependencies, no cycle, and templates that read
    only inputs, declared variables and the step's own ancestors.

    Attributes:
        name: The workflow's name.
        steps: The steps in their given order.
        inputs: The declared inputs; empty accepts any.
        outputs: Output name to template; empty means every step's output by step id.
        variables: Variable name to template.
        content_hash: A hash of the wire form; identical workflows share it.
    """

    name: str
    steps: tuple[StepSpec, ...]
    inputs: tuple[InputSpec, ...] = ()
    outputs: Mapping[str, str] = field(default_factory=dict)
    variables: Mapping[str, str] = field(default_factory=dict)
    content_hash: str = ""

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

    def paths(self, prefix: str = "") -> Iterator[str]:
        """Yields the path of every step, nested ones as ``outer/inner``, parents first."""
        for step in self.steps:
            yield prefix + step.id
            if step.workflow is not None:
                yield from step.workflow.paths(f"{prefix}{step.id}/")

    def bind_inputs(self, given: Mapping[str, JSON], *, field: str = "inputs") -> dict[str, JSON]:
        """Returns the inputs with defaults applied.

        Raises:
            InvalidArgumentError: An input is missing, of the wrong type, or not declared.
        """
        if not self.inputs:
            return dict(given)
        violations: list[Violation] = []
        bound: dict[str, JSON] = {}
        declared = {spec.name for spec in self.inputs}
        violations.extend(
            Violation(f"{field}.{name}", "is not an input of the workflow") for name in given if name not in declared
        )
        for spec in self.inputs:
            value = given.get(spec.name, spec.default)
            if value is _MISSING:
                if spec.required:
                    violations.append(Violation(f"{field}.{spec.name}", "is required"))
                continue
            check = _TYPE_CHECKS.get(spec.type)
            if check is not None and not check[1](value):
                violations.append(Violation(f"{field}.{spec.name}", f"must be {check[0]}, got {_shown(value)}"))
            bound[spec.name] = value
        if violations:
            raise InvalidArgumentError(violations, reason="INVALID_INPUTS")
        return bound


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


class _Ancestry:
    """Answers whether a step of an acyclic workflow is among another's transitive dependencies.

    A direct dependency is answered from a set of the step's own, in O(1). Anything further needs
    the step's ancestor set: an integer bitset over the steps' positions, computed once per step and
    only for the steps that need one and their ancestors, each from its dependencies' sets, so that
    no edge is followed twice. For V steps and E dependencies that costs at most O(E * V / 64) word
    operations and V sets of V bits (12.5 MB at 10,000 steps).

    Args:
        edges: Each step's direct dependencies, in the workflow's order; acyclic.
    """

    def __init__(self, edges: Mapping[str, tuple[str, ...]]) -> None:
        self._edges = edges
        self._ids = list(edges)
        self._positions = {step_id: position for position, step_id in enumerate(edges)}
        self._direct: dict[str, frozenset[str]] = {}
        self._sets: dict[str, int] = {}

    def _ancestors(self, step_id: str) -> int:
        sets, edges, positions = self._sets, self._edges, self._positions
        stack = [step_id]
        while stack:
            current = stack[-1]
            if current in sets:
                stack.pop()
                continue
            waiting = [dependency for dependency in edges[current] if dependency not in sets]
            if waiting:  # each is settled before ``current`` is on top again
                stack.extend(waiting)
                continue
            stack.pop()
            found = 0
            for dependency in edges[current]:
                found |= sets[dependency] | 1 << positions[dependency]
            sets[current] = found
        return sets[step_id]

    def reads(self, step_id: str, name: str) -> bool:
        """Returns whether step ``step_id`` may read the output of ``name``: one of its ancestors."""
        direct = self._direct.get(step_id)
        if direct is None:
            direct = self._direct[step_id] = frozenset(self._edges[step_id])
        if name in direct:
            return True
        position = self._positions.get(name)
        return position is not None and bool(self._ancestors(step_id) >> position & 1)

    def outside(self, step_id: str, names: _StepSet) -> tuple[list[str], int]:
        """Returns how many of ``names`` are not among the ancestors of ``step_id``, and up to
        :data:`_LISTED_NAMES` of them, sorted: those that are no step first, then in step order."""
        rest = names.mask & ~self._ancestors(step_id) if names.mask else 0
        count = len(names.unknown) + rest.bit_count()
        found = list(names.unknown[:_LISTED_NAMES])
        while rest and len(found) < _LISTED_NAMES:
            lowest = rest & -rest
            found.append(self._ids[lowest.bit_length() - 1])
            rest ^= lowest
        return sorted(found), count

    def step_set(self, names: Collection[str]) -> _StepSet:
        """Returns step names as a bitset, with the names that are no step apart."""
        mask = 0
        unknown = []
        for name in names:
            position = self._positions.get(name)
            if position is None:
                unknown.append(name)
            else:
                mask |= 1 << position
        return _StepSet(mask, tuple(sorted(unknown)))


@dataclass(frozen=True, slots=True)
class _StepSet:
    """Step names as a bitset over a workflow's steps, and the names that are no step of it."""

    mask: int
    unknown: tuple[str, ...]


class _Checker:
    """Collects every problem of a workflow and of the workflows nested in it."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.violations: list[Violation] = []

    def add(self, field: str, description: str) -> None:
        self.violations.append(Violation(field, description))

    def _unique_name(self, field: str, name: str, seen: dict[str, int], index: int, collection: str) -> None:
        """Checks that ``name`` is a name (a letter or _, then letters, digits, _ or -) not yet in ``seen``."""
        if not _NAME.fullmatch(name):
            self.add(field, f"{quoted(name)} is not a name (a letter or _, then letters, digits, _ or -)")
        elif name in seen:
            self.add(field, f"duplicates the name of {collection}[{seen[name]}]")
        else:
            seen[name] = index

    def _references(self, value: JSON, field: str) -> Iterator[tuple[str, Path]]:
        try:
            yield from templates(value, field)
        except TemplateError as exc:
            self.add(exc.field, exc.message)

    def _variable_steps(self, workflow: orchestrator_service_pb2.Workflow, field: str) -> dict[str, set[str]]:
        """Checks the variables and returns the steps each one reads."""
        reads: dict[str, set[str]] = {}
        for name, template in workflow.variables.items():
            where = f"{field}.variables.{name}"
            if not _NAME.fullmatch(name):
                self.add(where, "is not a variable name (a letter or _, then letters, digits, _ or -)")
            reads[name] = set()
            for _, path in self._references(template, where):
                if path[0] == "vars":
                    self.add(where, "variables may read inputs and step outputs, not other variables")
                elif path[0] == "steps":
                    reads[name].add(str(path[1]))
        return reads

    def _check_reads(
        self,
        reads: list[tuple[str, str, str]],
        step_id: str,
        ancestry: _Ancestry,
        known_vars: Mapping[str, set[str]],
        variable_sets: dict[str, _StepSet],
    ) -> None:
        """Checks (field, root, name) reads of step outputs and variables against a step's ancestors."""
        for where, root, name in reads:
            if root == "steps" and not ancestry.reads(step_id, name):
                self.add(where, f"reads the output of {name!r}, not among the step's dependencies")
            elif root == "vars" and name not in known_vars:
                self.add(where, f"reads the undeclared variable {name!r}")
            elif root == "vars":
                steps = variable_sets.get(name)
                if steps is None:
                    steps = variable_sets[name] = ancestry.step_set(known_vars[name])
                missing, count = ancestry.outside(step_id, steps)
                if count:
                    listed = ", ".join(missing) + (f" and {count - len(missing)} more" if count > len(missing) else "")
                    self.add(where, f"reads variable {name!r}, which reads {listed}, not among the step's dependencies")

    def check(self, workflow: orchestrator_service_pb2.Workflow, field: str, depth: int) -> WorkflowSpec | None:
        before = len(self.violations)
        steps_field = f"{field}.steps"
        if not workflow.steps:
            self.add(steps_field, "a workflow needs at least one step")
        inputs = self._inputs(workflow, field)
        known_vars = self._variable_steps(workflow, field)
        first_index: dict[str, int] = {}
        for index, step in enumerate(workflow.steps):
            where = f"{steps_field}[{index}]"
            self._unique_name(f"{where}.id", step.id, first_index, index, "steps")
            if bool(step.tool) == step.HasField("workflow"):
                self.add(f"{where}.tool", "a step names a tool or holds a nested workflow, exactly one of them")
        edges: dict[str, tuple[str, ...]] = {}
        for index, step in enumerate(workflow.steps):
            if first_index.get(step.id) != index:
                continue
            known = []
            for position, dependency in enumerate(step.depends_on):
                dep_field = f"{steps_field}[{index}].depends_on[{position}]"
                if dependency == step.id:
                    self.add(dep_field, f"step {step.id!r} depends on itself")
                elif dependency not in first_index:
                    self.add(dep_field, f"unknown step {dependency!r}")
                else:
                    known.append(dependency)
            edges[step.id] = tuple(dict.fromkeys(known))
        cycle = _find_cycle(edges)
        if cycle:
            # Shown in running order: each step must finish before the next one starts.
            self.add(steps_field, "dependency cycle: " + " -> ".join(reversed(cycle)))
            return None
        ancestry = _Ancestry(edges)
        variable_sets: dict[str, _StepSet] = {}
        specs = []
        for index, step in enumerate(workflow.steps):
            if first_index.get(step.id) == index:
                where = f"{steps_field}[{index}]"
                specs.append(self._step(step, where, edges, ancestry, known_vars, variable_sets, depth))
        for name, template in workflow.outputs.items():
            for _, path in self._references(template, f"{field}.outputs.{name}"):
                if path[0] == "steps" and path[1] not in first_index:
                    self.add(f"{field}.outputs.{name}", f"reads the output of the unknown step {path[1]!r}")
                elif path[0] == "vars" and path[1] not in known_vars:
                    self.add(f"{field}.outputs.{name}", f"reads the undeclared variable {path[1]!r}")
        if len(self.violations) > before:
            return None
        return WorkflowSpec(
            name=workflow.name,
            steps=tuple(spec for spec in specs if spec is not None),
            inputs=inputs,
            outputs=dict(workflow.outputs),
            variables=dict(workflow.variables),
            content_hash=content_hash(workflow),
        )

    def _inputs(self, workflow: orchestrator_service_pb2.Workflow, field: str) -> tuple[InputSpec, ...]:
        specs = []
        seen: dict[str, int] = {}
        for index, declared in enumerate(workflow.inputs):
            where = f"{field}.inputs[{index}]"
            self._unique_name(f"{where}.name", declared.name, seen, index, "inputs")
            default = from_value(declared.default_value) if declared.HasField("default_value") else _MISSING
            check = _TYPE_CHECKS.get(declared.type)
            if default is not _MISSING and check is not None and not check[1](default):
                self.add(f"{where}.default_value", f"must be {check[0]}, got {_shown(default)}")
            specs.append(InputSpec(declared.name, declared.type, default, declared.required))
        return tuple(specs)

    def _step(
        self,
        step: orchestrator_service_pb2.WorkflowStep,
        where: str,
        edges: Mapping[str, tuple[str, ...]],
        ancestry: _Ancestry,
        known_vars: Mapping[str, set[str]],
        variable_sets: dict[str, _StepSet],
        depth: int,
    ) -> StepSpec | None:
        parameters = from_struct(step.parameters)
        reads = [
            (template_field, str(path[0]), str(path[1]))
            for template_field, path in [
                *self._references(parameters, f"{where}.parameters"),
                *self._references(step.prompt, f"{where}.prompt"),
            ]
            if path[0] != "inputs"
        ]
        when = None
        if step.when:
            try:
                when = jmespath.compile(step.when)
                if _builds(when.parsed):
                    when = None
                    self.add(f"{where}.when", _BUILDS)
            except JMESPathError as exc:
                self.add(f"{where}.when", f"is not a JMESPath expression: {brief(str(exc))}")
            except RecursionError:  # jmespath parses by recursive descent
                self.add(f"{where}.when", "is not a JMESPath expression: it nests too deeply")
            reads.extend((f"{where}.when", "steps", name) for name in _STEP_REFERENCE.findall(step.when))
            reads.extend((f"{where}.when", "vars", name) for name in _VARIABLE_REFERENCE.findall(step.when))
        if reads:
            self._check_reads(reads, step.id, ancestry, known_vars, variable_sets)
        if step.strategy in (common_pb2.STRATEGY_CONVERSATIONAL, common_pb2.STRATEGY_REASONING) and not step.prompt:
            self.add(f"{where}.prompt", "a conversational or reasoning step needs a prompt")
        nested = None
        if step.HasField("workflow"):
            if depth >= self.max_depth:
                self.add(f"{where}.workflow", f"workflows may nest at most {self.max_depth} deep")
            else:
                nested = self.check(step.workflow, f"{where}.workflow", depth + 1)
        retry = step.retry
        return StepSpec(
            id=step.id,
            name=step.name or step.id,
            tool=step.tool,
            parameters=parameters,
            depends_on=edges[step.id],
            strategy=step.strategy,
            timeout_seconds=to_seconds(step.timeout),
            workflow=nested,
            retry=RetrySpec(
                max_attempts=max(retry.max_attempts, 1),
                initial_seconds=to_seconds(retry.initial_backoff) or 1.0,
                multiplier=retry.backoff_multiplier or 2.0,
                max_seconds=to_seconds(retry.max_backoff) or 60.0,
            ),
            when=when,
            optional=step.optional,
            prompt=step.prompt,
        )


def unknown_tools(
    workflow: orchestrator_service_pb2.Workflow, tools: Collection[str], *, field: str = "workflow"
) -> list[Violation]:
    """Returns a violation for every step, nested ones too, that names a tool not in ``tools``."""
    found = []
    for index, step in enumerate(workflow.steps):
        where = f"{field}.steps[{index}]"
        if step.tool and step.tool not in tools:
            found.append(
                Violation(f"{where}.tool", f"unknown tool {step.tool!r}; ListTools names the registered tools")
            )
        if step.HasField("workflow"):
            found.extend(unknown_tools(step.workflow, tools, field=f"{where}.workflow"))
    return found


def check_workflow(
    workflow: orchestrator_service_pb2.Workflow, *, field: str = "workflow", max_depth: int = DEFAULT_MAX_DEPTH
) -> WorkflowSpec:
    """Checks a wire workflow, and those nested in it, and returns it as a :class:`WorkflowSpec`.

    Runs in time linear in the steps, the dependencies and the text of the workflow, with two
    exceptions bounded by what is read: a step that reads the output of an indirect ancestor, or a
    variable, needs its ancestor set (at most O(E * V / 64) word operations over a workflow of V
    steps and E dependencies, see :class:`_Ancestry`), and each nested workflow is hashed again
    (O(size * depth)). The boundary has bounded the steps (at most 10,000 a workflow) before.

    Args:
        workflow: The workflow.
        field: The name of the workflow's field in the request, for violations.
        max_depth: How deeply workflows may nest.

    Raises:
        InvalidArgumentError: With one violation for every problem found, each naming its field.
    """
    checker = _Checker(max_depth)
    spec = checker.check(workflow, field, 1)
    if spec is None or checker.violations:
        raise InvalidArgumentError(checker.violations, reason="INVALID_WORKFLOW")
    return spec
