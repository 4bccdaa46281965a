"""The values a (sub)workflow's templates read: inputs, step outputs and run variables, resolved
lazily (a step output becomes a Python value on first use) and cached for the run."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from google.protobuf import struct_pb2

from tierstack.core.templates import Budget, Path, TemplateError, lookup, parse_path, render
from tierstack.core.values import JSON, from_value
from tierstack.core.workflow import WorkflowSpec
from tierstack.server.metrics import RateMeter

_NOT_DONE = object()


class _Lazy:
    """A read-only mapping view for JMESPath (which reads fields with ``get``)."""

    def __init__(self, load: Callable[[str], Any]) -> None:
        self._load = load

    def get(self, key: str, default: Any = None) -> Any:
        value = self._load(key)
        return default if value is _NOT_DONE else value


class RunContext:
    """Resolves templates for one workflow instance of a run.

    Args:
        spec: The workflow whose templates are resolved.
        inputs: Its inputs, defaults applied.
        output_of: Returns a step's output, or None while the step has not completed.
        on_variable: Called once per variable when it is first resolved.
        meter: Counts the paths resolved (context operations).
        max_bytes: What one rendering (a variable, the outputs, a batch of expressions) may fill in.
    """

    def __init__(
        self,
        spec: WorkflowSpec,
        inputs: Mapping[str, JSON],
        output_of: Callable[[str], struct_pb2.Value | None],
        on_variable: Callable[[str, JSON], None],
        meter: RateMeter | None = None,
        *,
        max_bytes: int,
    ) -> None:
        self.max_bytes = max_bytes
        self._meter = meter
        self._spec = spec
        self._inputs = dict(inputs)
        self._output_of = output_of
        self._on_variable = on_variable
        self._outputs: dict[str, JSON] = {}
        self._variables: dict[str, JSON] = {}

    def _output(self, step_id: str) -> Any:
        if step_id not in self._outputs:
            raw = self._output_of(step_id)
            if raw is None:
                return _NOT_DONE
            self._outputs[step_id] = from_value(raw)
        return self._outputs[step_id]

    def _variable(self, name: str) -> Any:
        if name not in self._variables:
            template = self._spec.variables.get(name)
            if template is None:
                return _NOT_DONE
            self._variables[name] = render(template, self.resolve, f"vars.{name}", Budget(self.max_bytes))
            self._on_variable(name, self._variables[name])
        return self._variables[name]

    def resolve(self, path: Path, field: str) -> JSON:
        """Returns the value a template path names.

        Raises:
            TemplateError: The path does not exist, or names a step that has not completed.
        """
        if self._meter is not None:
            self._meter.add()
        root = path[0]
        if root == "inputs":
            return lookup({"inputs": self._inputs}, path, field)
        name = str(path[1])
        found = self._output(name) if root == "steps" else self._variable(name)
        if found is _NOT_DONE:
            what = f"step {name!r} has not completed" if root == "steps" else f"no variable {name!r}"
            raise TemplateError(field, what)
        scope = {"steps": {name: {"output": found}}} if root == "steps" else {"vars": {name: found}}
        return lookup(scope, path, field)

    def resolve_all(self, expressions: Sequence[str], *, field: str = "expressions") -> list[JSON]:
        """Resolves a batch of expressions (with or without ``{{ }}``), in order.

        Raises:
            TemplateError: An expression is malformed or cannot be resolved.
        """
        values = []
        budget = Budget(self.max_bytes)
        for index, expression in enumerate(expressions):
            text = expression.strip().removeprefix("{{").removesuffix("}}")
            where = f"{field}[{index}]"
            values.append(self.resolve(parse_path(text, field=where), where))
            budget.spend(values[-1], where)
        return values

    def holds(self, condition: Any) -> bool:
        """Returns whether a compiled JMESPath condition is truthy over inputs, steps and vars."""
        scope = {
            "inputs": self._inputs,
            "steps": _Lazy(lambda step_id: _wrap(self._output(step_id))),
            "vars": _Lazy(self._variable),
        }
        return bool(condition.search(scope))

    def outputs(self) -> dict[str, JSON] | None:
        """Returns the declared outputs (a step that has not completed reads as null), or None when
        the workflow declares none."""
        if not self._spec.outputs:
            return None

        def lenient(path: Path, field: str) -> JSON:
            try:
                return self.resolve(path, field)
            except TemplateError:
                return None

        budget = Budget(self.max_bytes)
        return {
            name: render(template, lenient, f"outputs.{name}", budget) for name, template in self._spec.outputs.items()
        }


def _wrap(output: Any) -> Any:
    return _NOT_DONE if output is _NOT_DONE else {"output": output}
