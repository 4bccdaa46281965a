"""Tier 3, execution intelligence: tools, their registry and the executor."""

from tierstack.server.execute.engine import Executor
from tierstack.server.execute.python_tools import ENTRY_POINT_GROUP, schema_of, tool
from tierstack.server.execute.registry import Tool, ToolContext, ToolError, ToolRegistry, ToolSource

__all__ = [
    "ENTRY_POINT_GROUP",
    "Executor",
    "Tool",
    "ToolContext",
    "ToolError",
    "ToolRegistry",
    "ToolSource",
    "schema_of",
    "tool",
]
