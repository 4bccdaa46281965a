"""Tier 3, execution intelligence: tools, their registry and the executor."""

from tierstack.server.execute.engine import Executor
from tierstack.server.execute.python_tools import ENTRY_POINT_GROUP, schema_of, tool
from tierstack.server.execute.registry import Tool, ToolContext, ToolError, ToolRegistry, ToolSource
from tierstack.server.execute.service import ExecuteService

__all__ = [
    "ENTRY_POINT_GROUP",
    "ExecuteService",
    "Executor",
    "Tool",
    "ToolContext",
    "ToolError",
    "ToolRegistry",
    "ToolSource",
    "schema_of",
    "tool",
]
