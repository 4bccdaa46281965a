"""Resource budgets: adding up usage, and what a budget has left."""

from __future__ import annotations

from tierstack.v1 import common_pb2

#: The limits that count something used up, with the usage field each one bounds.
COUNTED = (("max_credits", "credits"), ("max_tokens", "tokens"), ("max_tool_calls", "tool_calls"))


def add_usage(total: common_pb2.ResourceUsage, usage: common_pb2.ResourceUsage) -> None:
    """Adds ``usage`` to ``total`` (all but the duration)."""
    total.tool_calls += usage.tool_calls
    total.tokens += usage.tokens
    total.credits += usage.credits


def left_of(limits: common_pb2.ResourceLimits, used: common_pb2.ResourceUsage) -> dict[str, float]:
    """Returns what is left of each limit that is set, by limit name (zero or less when spent)."""
    return {name: limit - getattr(used, field) for name, field in COUNTED if (limit := getattr(limits, name))}


def spent_message(limits: common_pb2.ResourceLimits, left: dict[str, float]) -> str:
    """Describes the first spent limit of ``left``; empty when none is spent."""
    for name, value in left.items():
        if value <= 0:
            limit = getattr(limits, name)
            return f"{name.removeprefix('max_').replace('_', ' ')} spent: {limit - value:g} of {limit:g}"
    return ""
