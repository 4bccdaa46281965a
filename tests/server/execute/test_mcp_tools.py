"""MCP servers' tools, mounted under a prefix, over stdio and over streamable HTTP."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import free_port, start_tier
from tierstack.client import ExecutorClient, InvalidArgumentError
from tierstack.core.values import from_value, to_struct
from tierstack.server import Settings
from tierstack.v1 import common_pb2, executor_service_pb2

SERVER = textwrap.dedent(
    """
    import sys
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("demo")

    @server.tool()
    def add(a: int, b: int) -> int:
        "Adds two whole numbers."
        return a + b

    @server.tool()
    def shout(text: str) -> str:
        "Shouts."
        if not text:
            raise ValueError("nothing to shout")
        return text.upper()

    if __name__ == "__main__":
        if sys.argv[1] == "stdio":
            server.run("stdio")
        else:
            server.run("streamable-http", port=int(sys.argv[2]))
    """
)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "demo_mcp_server.py"
    path.write_text(SERVER)
    return path


def call(tool: str, **arguments: object) -> executor_service_pb2.ExecuteToolRequest:
    return executor_service_pb2.ExecuteToolRequest(call=common_pb2.ToolCall(tool=tool, arguments=to_struct(arguments)))


async def exercise(settings: Settings) -> None:
    server = await start_tier("execute", settings)
    try:
        async with ExecutorClient(server.target) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert tools["demo.add"].source == executor_service_pb2.TOOL_SOURCE_MCP
            assert tools["demo.add"].description == "Adds two whole numbers."
            assert from_value((await client.execute_tool(call("demo.add", a=2, b=3))).result.output) == 5
            assert from_value((await client.execute_tool(call("demo.shout", text="hi"))).result.output) == "HI"
            failed = (await client.execute_tool(call("demo.shout", text=""))).result
            assert failed.error.reason == "MCP_TOOL_ERROR" and "shout" in failed.error.message
            with pytest.raises(InvalidArgumentError) as caught:
                await client.execute_tool(call("demo.add", a="two", b=3))
            assert caught.value.violations[0].field == "call.arguments.a"
    finally:
        await server.stop()


async def test_a_stdio_server_is_mounted(script: Path) -> None:
    servers = {"demo": {"command": [sys.executable, str(script), "stdio"]}}
    await exercise(Settings(mcp_servers=json.dumps(servers)))


@pytest.fixture
async def http_mcp(script: Path) -> AsyncIterator[str]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(sys.executable, str(script), "http", str(port))
    try:
        for _ in range(500):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            await writer.wait_closed()
            break
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        await process.wait()


async def test_a_streamable_http_server_is_mounted(http_mcp: str) -> None:
    await exercise(Settings(mcp_servers=json.dumps({"demo": {"url": http_mcp}})))
