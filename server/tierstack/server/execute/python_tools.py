"""Python functions as tools: ``@tool`` derives the parameter schema from type hints; packages offer
tools through the ``tierstack.tools`` entry-point group."""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import logging
import types
import typing
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Any

from tierstack.core.values import JSON
from tierstack.server.execute.registry import Tool, ToolContext, ToolError, ToolHandler, ToolRegistry, ToolSource

_log = logging.getLogger(__name__)

#: The entry-point group third-party packages register tools in; each entry names a Tool or an
#: iterable of Tools.
ENTRY_POINT_GROUP = "tierstack.tools"

_SCALARS: dict[Any, dict[str, Any]] = {
    str: {"type": "string"},
    int: {"type": "integer"},
    float: {"type": "number"},
    bool: {"type": "boolean"},
    type(None): {"type": "null"},
    Any: {},
}


def schema_of(hint: Any) -> dict[str, Any]:
    """Returns the JSON Schema of a type hint (str, int, float, bool, None, Any, list, dict, tuple,
    Literal, unions and Optional).

    Raises:
        TypeError: The hint has no JSON form.
    """
    if hint in _SCALARS:
        return dict(_SCALARS[hint])
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [schema_of(arg) for arg in args]}
    if origin is tuple and args and args[-1] is not Ellipsis:
        items = [schema_of(arg) for arg in args]
        return {"type": "array", "prefixItems": items, "minItems": len(items), "maxItems": len(items)}
    if origin in (list, set, frozenset, tuple) or hint in (list, tuple):
        return {"type": "array", "items": schema_of(args[0]) if args else {}}
    if origin is dict or hint is dict:
        if args and args[0] is not str:
            raise TypeError(f"object keys must be strings, not {args[0]!r}")
        return {"type": "object", "additionalProperties": schema_of(args[1]) if args else {}}
    raise TypeError(f"{hint!r} has no JSON Schema form")


class PythonFunction:
    """A module-level sync function as a tool's worker function: it pickles as its module and
    qualified name, and a worker finds it there (behind the Tool that ``@tool`` bound the name to).

    Args:
        module: The function's module.
        qualname: Its qualified name in the module.
        context_parameter: The name of its ToolContext parameter, if it has one.
        function: The function itself, when known; else it is looked up on the first call.
    """

    def __init__(
        self, module: str, qualname: str, context_parameter: str | None, function: Callable[..., Any] | None = None
    ) -> None:
        self._module = module
        self._qualname = qualname
        self._context_parameter = context_parameter
        self._function = function

    def __reduce__(self) -> tuple[Any, ...]:
        return PythonFunction, (self._module, self._qualname, self._context_parameter)

    def _found(self) -> Callable[..., Any]:
        if self._function is None:
            try:
                found: Any = importlib.import_module(self._module)
                for part in self._qualname.split("."):
                    found = getattr(found, part)
            except (ImportError, AttributeError):
                found = None
            if isinstance(found, Tool) and isinstance(found.function, PythonFunction):
                found = found.function._function
            if not callable(found) or getattr(found, "__qualname__", None) != self._qualname:
                raise ToolError(
                    "TOOL_NOT_FOUND",
                    f"a worker process cannot find {self._qualname} in {self._module}; define it at module level",
                )
            self._function = found
        return self._function

    def __call__(self, arguments: dict[str, Any], context: ToolContext) -> JSON:
        result: JSON = self._found()(**_keywords(arguments, context, self._context_parameter))
        return result


def _keywords(arguments: dict[str, Any], context: ToolContext, context_parameter: str | None) -> dict[str, Any]:
    """Returns a call's keyword arguments: its arguments, and its context if the function takes it."""
    return {**arguments, context_parameter: context} if context_parameter else arguments


def tool(
    name: str | None = None,
    *,
    description: str | None = None,
    timeout_seconds: float = 30.0,
    credits: float = 0.0,
    needs_approval: bool = False,
    pure: bool = False,
    critical: bool = False,
) -> Callable[[Callable[..., Any]], Tool]:
    """Turns a function into a :class:`Tool` (register it, or offer it through the entry points).

    The function's keyword parameters become the tool's arguments, their type hints its JSON Schema,
    parameters without a default the required ones; a parameter annotated :class:`ToolContext`
    receives the call's context instead. The name defaults to the function's, the description to its
    docstring.

    A coroutine function runs on the event loop. A sync function defined at a module's top level
    runs in a worker process, where the call's deadline can stop it (the worker is killed) and the
    worker memory cap holds; the worker imports its module and finds it by its qualified name. It
    gets the call's context as a copy: tokens it adds to ``context.meter`` are not counted. A sync
    function the worker cannot find by name (one defined inside another function, say) runs in a
    thread instead: off the event loop, but a deadline only stops waiting for it, not the function.

    Example::

        @tool("math.add")
        def add(a: float, b: float = 0) -> float:
            "Adds two numbers."
            return a + b
    """

    def decorate(function: Callable[..., Any]) -> Tool:
        hints = typing.get_type_hints(function)
        properties: dict[str, Any] = {}
        required = []
        context_parameter = None
        for parameter in inspect.signature(function).parameters.values():
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD, parameter.POSITIONAL_ONLY):
                raise TypeError(f"{function.__qualname__}: tools take named parameters only")
            if hints.get(parameter.name) is ToolContext:
                context_parameter = parameter.name
                continue
            properties[parameter.name] = schema_of(hints.get(parameter.name, Any))
            if parameter.default is parameter.empty:
                required.append(parameter.name)
        schema = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}

        handler: ToolHandler | None = None
        in_worker: PythonFunction | None = None
        if inspect.iscoroutinefunction(function):

            async def run_on_loop(arguments: dict[str, Any], context: ToolContext) -> JSON:
                result: JSON = await function(**_keywords(arguments, context, context_parameter))
                return result

            handler = run_on_loop
        elif "<" in function.__qualname__:  # <locals>, <lambda>: no name a worker could find it by

            async def run_in_thread(arguments: dict[str, Any], context: ToolContext) -> JSON:
                call = functools.partial(function, **_keywords(arguments, context, context_parameter))
                result: JSON = await asyncio.to_thread(call)
                return result

            handler = run_in_thread
        else:
            in_worker = PythonFunction(function.__module__, function.__qualname__, context_parameter, function)

        return Tool(
            name=name or function.__name__,
            description=description or inspect.getdoc(function) or "",
            parameters=schema,
            handler=handler,
            function=in_worker,
            source=ToolSource.PYTHON,
            timeout_seconds=timeout_seconds,
            credits=credits,
            needs_approval=needs_approval,
            pure=pure,
            critical=critical,
        )

    return decorate


def register_entry_point_tools(registry: ToolRegistry) -> None:
    """Registers the tools every installed package offers in the ``tierstack.tools`` group; a
    package that fails to load is logged and skipped."""
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            offered = entry.load()
            tools: Iterable[Tool] = [offered] if isinstance(offered, Tool) else offered
            for found in tools:
                registry.register(found)
        except Exception:
            _log.exception("the tools of entry point %r could not be registered", entry.name)
