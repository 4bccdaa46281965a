"""Tools served by MCP servers (stdio or streamable HTTP, through the official ``mcp`` SDK), mounted
under a prefix: the tool ``add`` of the server named ``math`` becomes ``math.add``."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED, REQUEST_TIMEOUT

from tierstack.core.errors import brief
from tierstack.core.values import JSON
from tierstack.server.breaker import Breakers, CircuitBreaker
from tierstack.server.execute.registry import Tool, ToolContext, ToolError, ToolRegistry, ToolSource

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class McpServer:
    """An MCP server to mount: a command to start (stdio) or a URL (streamable HTTP).

    Attributes:
        prefix: What its tools' names start with.
        command: The program and its arguments, for stdio.
        url: The endpoint, such as ``http://127.0.0.1:8000/mcp``, for streamable HTTP.
        env: Extra environment variables for a stdio server.
    """

    prefix: str
    command: tuple[str, ...] = ()
    url: str = ""
    env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> list[McpServer]:
        """Reads ``{"prefix": {"command": [...]} | {"url": "..."}, ...}`` (``TIERSTACK_MCP_SERVERS``).

        Raises:
            ValueError: The text is not such an object.
        """
        servers = []
        for prefix, spec in (json.loads(text) if text.strip() else {}).items():
            if not isinstance(spec, dict) or bool(spec.get("command")) == bool(spec.get("url")):
                raise ValueError(f"MCP server {prefix!r} needs a `command` list or a `url`, not both")
            servers.append(cls(prefix, tuple(spec.get("command", ())), spec.get("url", ""), spec.get("env", {})))
        return servers


class McpMounts:
    """Holds one session per configured MCP server, each in a task of its own (the SDK's transports
    must be entered and left in one task), and registers their tools.

    Args:
        servers: The servers to mount.
        breakers: A circuit breaker per server and tool: a tool whose calls failed (no answer from
            its server) 5 times within a minute is not called until a probe works.
    """

    def __init__(self, servers: Sequence[McpServer], breakers: Breakers | None = None) -> None:
        self._servers = tuple(servers)
        self.breakers = breakers if breakers is not None else Breakers()
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    async def start(self, registry: ToolRegistry) -> None:
        """Connects to every server and registers its tools.

        Raises:
            RuntimeError: A server could not be reached or listed; the mounts already made are closed.
        """
        for server in self._servers:
            ready: asyncio.Future[ClientSession] = asyncio.get_running_loop().create_future()
            self._tasks.append(asyncio.create_task(self._hold(server, ready), name=f"mcp-{server.prefix}"))
            try:
                session = await ready
                listed = await session.list_tools()
            except Exception as exc:
                await self.close()
                raise RuntimeError(f"MCP server {server.prefix!r} could not be mounted: {exc}") from exc
            for found in listed.tools:
                registry.register(
                    Tool(
                        name=f"{server.prefix}.{found.name}",
                        description=found.description or "",
                        parameters=found.input_schema,
                        handler=_caller(session, found.name, self.breakers.of(f"{server.prefix}.{found.name}")),
                        source=ToolSource.MCP,
                    )
                )
            _log.info("mounted %d tools of MCP server %r", len(listed.tools), server.prefix)

    async def _hold(self, server: McpServer, ready: asyncio.Future[ClientSession]) -> None:
        try:
            async with AsyncExitStack() as stack:
                if server.command:
                    parameters = StdioServerParameters(
                        command=server.command[0], args=list(server.command[1:]), env=dict(server.env) or None
                    )
                    read, write = await stack.enter_async_context(stdio_client(parameters))
                else:
                    read, write, *_ = await stack.enter_async_context(streamable_http_client(server.url))
                session = await stack.enter_async_context(ClientSession(read, write))
                await session.initialize()
                ready.set_result(session)
                await self._stop.wait()
        except Exception as exc:
            if not ready.done():
                ready.set_exception(exc)
            else:
                _log.exception("the session with MCP server %r ended", server.prefix)

    async def close(self) -> None:
        """Closes every session and waits for their tasks."""
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()


def _caller(session: ClientSession, name: str, breaker: CircuitBreaker) -> Any:
    async def call(arguments: dict[str, Any], context: ToolContext) -> JSON:
        if not breaker.allow():
            raise ToolError("CIRCUIT_OPEN", f"{name} kept failing; calls to it wait for a probe to work")
        try:
            result = await session.call_tool(name, arguments)
        except MCPError as exc:
            if exc.code not in (CONNECTION_CLOSED, REQUEST_TIMEOUT):  # the server answered with an error
                breaker.succeeded()
                raise ToolError("MCP_TOOL_ERROR", f"{name} was refused: {brief(exc.message)}") from exc
            breaker.failed()
            raise ToolError("MCP_UNAVAILABLE", f"the MCP server did not answer {name}: {brief(exc.message)}") from exc
        except Exception as exc:  # the server did not answer (an error the tool reports is an answer)
            breaker.failed()
            raise ToolError("MCP_UNAVAILABLE", f"the MCP server did not answer {name}: {brief(str(exc))}") from exc
        breaker.succeeded()
        text = "\n".join(block.text for block in getattr(result, "content", ()) if hasattr(block, "text"))
        if getattr(result, "is_error", False):
            raise ToolError("MCP_TOOL_ERROR", text or f"{name} failed")
        structured = getattr(result, "structured_content", None)
        if structured is not None:
            value: JSON = structured.get("result", structured) if set(structured) == {"result"} else structured
            return value
        return text

    return call
