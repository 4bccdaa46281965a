"""For the tests of budgets: a tool that uses model tokens on demand, as a step that calls a model does,
and the warnings a run or a goal gave."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from tests.helpers import registry_of
from tierstack.core.values import JSON
from tierstack.server import TierServer
from tierstack.server.execute import Tool, ToolContext
from tierstack.v1 import coordinator_service_pb2, orchestrator_service_pb2


class Spender:
    """``test.spend``: uses the model tokens its call is told to (``tokens``; by default all its step may
    use, never more) and records what each call was allowed. A call with ``hold`` waits until
    :attr:`released` is set, and one with ``together`` at :attr:`together` until all of them are in flight."""

    def __init__(self, execute: TierServer) -> None:
        #: The tokens each call was allowed (None: no limit), in the order the calls came.
        self.allowed: list[int | None] = []
        self.released = asyncio.Event()
        self.together: asyncio.Barrier | None = None
        parameters = {
            "type": "object",
            "properties": {
                "tokens": {"type": "integer", "minimum": 0},
                "hold": {"type": "boolean"},
                "together": {"type": "boolean"},
            },
            "additionalProperties": False,
        }
        registry_of(execute).register(
            Tool(name="test.spend", description="Uses model tokens.", parameters=parameters, handler=self._spend)
        )

    async def _spend(self, arguments: dict[str, Any], context: ToolContext) -> JSON:
        left = context.tokens_left
        self.allowed.append(left)
        async with asyncio.timeout(30):  # a test that goes wrong fails instead of hanging
            if arguments.get("together"):
                assert self.together is not None
                await self.together.wait()
            if arguments.get("hold"):
                await self.released.wait()
        tokens: int = arguments.get("tokens", left or 0)
        if left is not None:
            tokens = min(tokens, left)
        context.meter.tokens += tokens
        return tokens


def warnings(
    events: Iterable[orchestrator_service_pb2.RunEvent | coordinator_service_pb2.GoalEvent],
) -> list[tuple[str, int, float, float]]:
    """Returns the budget warnings among a run's or a goal's events: budget, percent, used and limit."""
    found = [event.budget_warning for event in events if event.HasField("budget_warning")]
    return [(warning.budget, warning.percent, warning.used, warning.limit) for warning in found]
