"""Python functions as tools: ``@tool`` derives the parameter schema from type hints; packages offer
tools through the ``tierstack.tools`` entry-point group."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import types
import typing
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Any

from tierstack.client.values import JSON
from tierstack.server.execute.registry import Tool, ToolContext, ToolRegistry, ToolSource

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
    docstring. A sync function runs in a worker thread, off the event loop.

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

        def keywords(arguments: dict[str, Any], context: ToolContext) -> dict[str, Any]:
            return {**arguments, context_parameter: context} if context_parameter else arguments

        if inspect.iscoroutinefunction(function):

            async def handler(arguments: dict[str, Any], context: ToolContext) -> JSON:
                result: JSON = await function(**keywords(arguments, context))
                return result

        else:

            async def handler(arguments: dict[str, Any], context: ToolContext) -> JSON:
                result: JSON = await asyncio.to_thread(functools.partial(function, **keywords(arguments, context)))
                return result

        return Tool(
            name=name or function.__name__,
            description=description or inspect.getdoc(function) or "",
            parameters=schema,
            handler=handler,
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
