"""ExecuteStream: the Execute and CancelExecution calls of a tier above, many at once over one
long-lived stream, each served as the RPC of its name would serve it."""

from __future__ import annotations

from collections.abc import AsyncIterator

from tierstack.server import correlation
from tierstack.server.execute.engine import Executor
from tierstack.server.interceptor import CarriedCalls
from tierstack.server.multiplex import CANCEL_EXECUTION, EXECUTE, Kind, Multiplexer
from tierstack.v1 import executor_service_pb2 as pb


def execute_streams(executor: Executor, carried: CarriedCalls, *, max_message_bytes: int) -> Multiplexer:
    """Returns what serves ExecuteStream: steps, refused once Execute stops (a step is asked for again
    elsewhere or later), and cancellations."""

    async def execute(number: int, step: pb.ExecuteRequest) -> AsyncIterator[pb.ExecuteStreamResponse]:
        correlation.bind(step.context)
        async for event in executor.execute(step):
            yield pb.ExecuteStreamResponse(call=number, event=event)

    async def cancel(number: int, request: pb.CancelExecutionRequest) -> AsyncIterator[pb.ExecuteStreamResponse]:
        cancelled = await executor.cancel_execution(request.execution_id)
        yield pb.ExecuteStreamResponse(call=number, cancelled=pb.CancelExecutionResponse(cancelled=cancelled))

    kinds = {"execute": Kind(EXECUTE, execute, refused_when_stopping=True), "cancel": Kind(CANCEL_EXECUTION, cancel)}
    return Multiplexer(
        pb.ExecuteStreamRequest, pb.ExecuteStreamResponse, kinds, carried, max_message_bytes=max_message_bytes
    )
