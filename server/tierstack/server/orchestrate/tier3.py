"""How Orchestrate reaches Execute: every step over a few long-lived ExecuteStream calls, each carrying
many steps at once, so that a step costs two messages rather than a call of its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from tierstack.core.errors import DeadlineExceededError, InternalError
from tierstack.server.metrics import MethodMetrics
from tierstack.server.multiplex import CANCEL_EXECUTION, EXECUTE, Multiplexed
from tierstack.v1 import executor_service_pb2 as pb
from tierstack.v1 import executor_service_pb2_grpc

#: How many streams are kept open to Execute.
DEFAULT_STREAMS = 4


class ExecuteStreams:
    """Runs steps in Tier 3 over long-lived ExecuteStream calls (a ``StepRunner``).

    Args:
        channel: The channel to Execute (whose interceptors add the tier's key).
        metrics: Where each call is recorded, per method and status code, as calls of their own are.
        max_message_bytes: The largest message the channel sends.
        streams: How many streams are kept open.
        timeout: How long a cancellation may take, in seconds.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        metrics: MethodMetrics,
        *,
        max_message_bytes: int,
        streams: int = DEFAULT_STREAMS,
        timeout: float = 30.0,
    ) -> None:
        stub = executor_service_pb2_grpc.ExecutorServiceStub(channel)
        self._calls = Multiplexed(stub.ExecuteStream, metrics, streams=streams, max_message_bytes=max_message_bytes)
        self._timeout = timeout

    async def execute(self, request: pb.ExecuteRequest) -> AsyncIterator[pb.ExecutionEvent]:
        """Runs one step and yields its events; leaving early lets it go (it runs on in Tier 3)."""
        async with self._calls.call(EXECUTE, pb.ExecuteStreamRequest(execute=request)) as call:
            async for answer in call:
                yield _answered(answer, "event").event

    async def cancel_execution(self, execution_id: str) -> bool:
        """Stops a step in flight; returns whether it was."""
        cancel = pb.CancelExecutionRequest(execution_id=execution_id)
        found = False
        try:
            async with (
                asyncio.timeout(self._timeout),
                self._calls.call(CANCEL_EXECUTION, pb.ExecuteStreamRequest(cancel=cancel)) as call,
            ):
                async for answer in call:
                    found = _answered(answer, "cancelled").cancelled.cancelled
        except TimeoutError:
            raise DeadlineExceededError("Execute did not answer the cancellation in time") from None
        return found

    async def close(self) -> None:
        """Closes every stream (steps in flight run on in Tier 3)."""
        await self._calls.close()


def _answered(answer: pb.ExecuteStreamResponse, kind: str) -> pb.ExecuteStreamResponse:
    """Returns an answer of the kind its call expects.

    Raises:
        InternalError: Execute answered with another kind.
    """
    if answer.WhichOneof("result") != kind:
        raise InternalError(f"Execute answered a call with {answer.WhichOneof('result')!r}, not {kind!r}")
    return answer
