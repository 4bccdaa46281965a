"""Resource budgets: adding up usage, what a budget has left, the shares of the parts of the work
that run at once, and the warnings a budget gives as it is used up."""

from __future__ import annotations

import math
from collections.abc import Iterable

from tierstack.core.values import to_seconds
from tierstack.v1 import common_pb2

#: The limits that count something used up, with the usage field each one bounds.
COUNTED = (("max_credits", "credits"), ("max_tokens", "tokens"), ("max_tool_calls", "tool_calls"))
#: The shares of a budget at which it warns, in percent, each once.
WARNING_PERCENTS = (80, 95)


def add_usage(total: common_pb2.ResourceUsage, usage: common_pb2.ResourceUsage) -> None:
    """Adds ``usage`` to ``total`` (all but the duration)."""
    total.tool_calls += usage.tool_calls
    total.tokens += usage.tokens
    total.credits += usage.credits


def left_of(limits: common_pb2.ResourceLimits, used: common_pb2.ResourceUsage) -> dict[str, float]:
    """Returns what is left of each limit that is set, by limit name (zero or less when spent)."""
    return {name: limit - getattr(used, field) for name, field in COUNTED if (limit := getattr(limits, name))}


def unreserved(
    limits: common_pb2.ResourceLimits,
    used: common_pb2.ResourceUsage,
    reserved: Iterable[common_pb2.ResourceLimits],
) -> dict[str, float]:
    """Returns what is left of each limit that is set once what is ``used`` and the shares ``reserved``
    for the parts of the work in flight are taken off, by limit name (zero or less when nothing is)."""
    committed = common_pb2.ResourceUsage()
    committed.CopyFrom(used)
    for share in reserved:
        committed.credits += share.max_credits
        committed.tokens += share.max_tokens
        committed.tool_calls += share.max_tool_calls
    return left_of(limits, committed)


def share_of(left: dict[str, float], weight: float) -> common_pb2.ResourceLimits:
    """Returns the part ``weight`` (from 0 to 1) of what is ``left`` (see :func:`unreserved`): credits in
    proportion, tokens and tool calls rounded down but at least one, so that a part that may run gets
    something; with at least one of each left, the share never holds more than is left."""
    share = common_pb2.ResourceLimits()
    for name, value in left.items():
        setattr(share, name, value * weight if name == "max_credits" else max(math.floor(value * weight), 1))
    return share


def spent_message(limits: common_pb2.ResourceLimits, left: dict[str, float]) -> str:
    """Describes the first spent limit of ``left``; empty when none is spent."""
    for name, value in left.items():
        if value <= 0:
            limit = getattr(limits, name)
            return f"{name.removeprefix('max_').replace('_', ' ')} spent: {limit - value:g} of {limit:g}"
    return ""


class BudgetWarnings:
    """The warnings of one run's or goal's budgets: each budget warns once at each of
    :data:`WARNING_PERCENTS` of its limit, however often it is checked, and a warning read back from
    the stored history is not given again.

    Args:
        limits: The budgets; a limit that is not set never warns.
        given: The warnings given before (read back from the stored events).
    """

    def __init__(self, limits: common_pb2.ResourceLimits, given: Iterable[common_pb2.BudgetWarning] = ()) -> None:
        self._limits: dict[str, float] = {
            field: limit for name, field in COUNTED if (limit := getattr(limits, name)) > 0
        }
        if seconds := to_seconds(limits.max_duration):
            self._limits["duration"] = seconds
        self._given = {(warning.budget, warning.percent) for warning in given}

    def due(self, used: common_pb2.ResourceUsage, elapsed: float) -> list[common_pb2.BudgetWarning]:
        """Returns the warnings that ``used`` and ``elapsed`` (the seconds since the work was created)
        have earned and not had yet, and counts them as given."""
        warnings = []
        for budget, limit in self._limits.items():
            value = elapsed if budget == "duration" else float(getattr(used, budget))
            for percent in WARNING_PERCENTS:
                if value >= limit * percent / 100 and (budget, percent) not in self._given:
                    self._given.add((budget, percent))
                    warnings.append(common_pb2.BudgetWarning(budget=budget, used=value, limit=limit, percent=percent))
        return warnings

    def times(self) -> list[float]:
        """Returns when the duration warnings not given yet fall due, in seconds since the work was created."""
        limit = self._limits.get("duration")
        if limit is None:
            return []
        return [limit * percent / 100 for percent in WARNING_PERCENTS if ("duration", percent) not in self._given]
