"""Python functions as tools: schemas from type hints, sync functions off the loop, entry points."""

from __future__ import annotations

import os
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from tests.helpers import start_tier
from tierstack.client import ExecutorClient, InvalidArgumentError
from tierstack.core.values import from_value, to_struct
from tierstack.server import Settings
from tierstack.server.execute import Tool, schema_of, tool
from tierstack.server.execute.service import ExecuteService
from tierstack.v1 import common_pb2, executor_service_pb2


def test_schemas_follow_the_type_hints() -> None:
    assert schema_of(str) == {"type": "string"}
    assert schema_of(list[int]) == {"type": "array", "items": {"type": "integer"}}
    assert schema_of(dict[str, float]) == {"type": "object", "additionalProperties": {"type": "number"}}
    assert schema_of(Literal["a", "b"]) == {"enum": ["a", "b"]}
    assert schema_of(int | None) == {"anyOf": [{"type": "integer"}, {"type": "null"}]}
    assert schema_of(tuple[str, int]) == {
        "type": "array",
        "prefixItems": [{"type": "string"}, {"type": "integer"}],
        "minItems": 2,
        "maxItems": 2,
    }
    with pytest.raises(TypeError):
        schema_of(dict[int, str])


@tool("demo.scale")
def scale(values: list[float], factor: float = 2.0, mode: Literal["up", "down"] = "up") -> list[float]:
    """Scales numbers."""
    return [v * factor if mode == "up" else v / factor for v in values]


@tool("demo.where")
def where() -> list[int]:
    """Says which process and thread it runs in."""
    return [os.getpid(), threading.get_ident()]


def nested_tool() -> Tool:
    @tool("demo.nested")
    def where_nested() -> list[int]:
        return [os.getpid(), threading.get_ident()]

    return where_nested


@tool()
async def greet(name: str, excited: bool = False) -> str:
    return f"Hello {name}{'!' if excited else '.'}"


def test_the_decorator_builds_a_tool() -> None:
    assert scale.name == "demo.scale" and scale.description == "Scales numbers."
    assert scale.parameters == {
        "type": "object",
        "properties": {
            "values": {"type": "array", "items": {"type": "number"}},
            "factor": {"type": "number"},
            "mode": {"enum": ["up", "down"]},
        },
        "required": ["values"],
        "additionalProperties": False,
    }
    assert greet.name == "greet"


async def test_python_tools_run_through_the_server() -> None:
    server = await start_tier("execute", Settings())
    service = server.service
    assert isinstance(service, ExecuteService)
    for found in (scale, greet, where, nested_tool()):
        service.registry.register(found)
    try:
        async with ExecutorClient(server.target) as client:

            async def call(tool_name: str, /, **arguments: Any) -> Any:
                request = executor_service_pb2.ExecuteToolRequest(
                    call=common_pb2.ToolCall(tool=tool_name, arguments=to_struct(arguments))
                )
                return from_value((await client.execute_tool(request)).result.output)

            assert await call("demo.scale", values=[1, 2], factor=3) == [3, 6]
            assert await call("greet", name="Ada", excited=True) == "Hello Ada!"
            with pytest.raises(InvalidArgumentError) as caught:
                await call("demo.scale", values=["x"], mode="sideways")
            assert {v.field for v in caught.value.violations} == {
                "call.arguments.values[0]",
                "call.arguments.mode",
            }
            sources = {t.name: t.source for t in (await client.list_tools()).tools}
            assert sources["demo.scale"] == executor_service_pb2.TOOL_SOURCE_PYTHON
            # Sync functions run off the event loop: in a worker process, or, when a worker could
            # not find them by name, in a thread.
            assert (await call("demo.where"))[0] != os.getpid()
            pid, thread = await call("demo.nested")
            assert pid == os.getpid() and thread != threading.get_ident()
    finally:
        await server.stop()


@pytest.fixture
def installed_plugin(tmp_path: Path) -> Iterator[None]:
    """A package installed the ordinary way: a module and a dist-info with an entry point."""
    (tmp_path / "tierstack_demo_plugin.py").write_text(
        textwrap.dedent(
            """
            from tierstack.server.execute import tool

            @tool("plugin.shout")
            def shout(text: str) -> str:
                return text.upper()

            TOOLS = [shout]
            """
        )
    )
    dist = tmp_path / "tierstack_demo_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tierstack-demo-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[tierstack.tools]\ndemo = tierstack_demo_plugin:TOOLS\n")
    sys.path.insert(0, str(tmp_path))
    try:
        yield
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("tierstack_demo_plugin", None)


async def test_installed_packages_offer_tools_through_entry_points(installed_plugin: None) -> None:
    server = await start_tier("execute", Settings())
    try:
        async with ExecutorClient(server.target) as client:
            response = await client.execute_tool(
                executor_service_pb2.ExecuteToolRequest(
                    call=common_pb2.ToolCall(tool="plugin.shout", arguments=to_struct({"text": "hi"}))
                )
            )
    finally:
        await server.stop()
    assert from_value(response.result.output) == "HI"
