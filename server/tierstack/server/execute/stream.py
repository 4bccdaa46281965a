"""ExecuteStream: the Execute and CancelExecution calls of a tier above, many at once over one
long-lived stream, each served as the RPC of its name would serve it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from google.rpc import status_pb2

from tierstack.client.defaults import MAX_STREAM_CALLS
from tierstack.core import tracing
from tierstack.core.errors import InvalidArgumentError, ResourceExhaustedError, UnavailableError, Violation
from tierstack.server import correlation
from tierstack.server.execute.engine import Executor
from tierstack.server.interceptor import CarriedCalls, malformed
from tierstack.server.status import status_of
from tierstack.v1 import common_pb2
from tierstack.v1 import executor_service_pb2 as pb

EXECUTE = "/tierstack.v1.ExecutorService/Execute"
CANCEL = "/tierstack.v1.ExecutorService/CancelExecution"

_Answer = pb.ExecuteStreamResponse | None  # None ends the stream


def _ended(call: int, status: status_pb2.Status) -> pb.ExecuteStreamResponse:
    return pb.ExecuteStreamResponse(
        call=call, ended=common_pb2.CallStatus(code=status.code, message=status.message, details=status.details)
    )


class StreamedCalls:
    """Serves every ExecuteStream of one server, and ends them all once it stops.

    Args:
        executor: Runs the steps and cancels them.
        carried: Admits, times and audits each call as the interceptor does a call of its own.
    """

    def __init__(self, executor: Executor, carried: CarriedCalls) -> None:
        self._executor = executor
        self._carried = carried
        self._streams: set[_Served] = set()
        self.stopping = False

    def stop(self) -> None:
        """Refuses new steps from now on (UNAVAILABLE, so that they are asked for again elsewhere or
        later) and ends each stream once its calls in flight have ended."""
        self.stopping = True
        for stream in self._streams:
            stream.end_if_idle()

    async def serve(self, requests: AsyncIterator[object], peer: str) -> AsyncIterator[pb.ExecuteStreamResponse]:
        """Serves one stream: reads its calls, and yields their answers as they come."""
        stream = _Served(self, peer)
        self._streams.add(stream)
        reader = asyncio.create_task(stream.read(requests), name="tierstack-execute-stream-reader")
        try:
            while (answer := await stream.answers.get()) is not None:
                yield answer
        finally:
            self._streams.discard(stream)
            tasks = [reader, *stream.calls.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class _Served:
    """One stream: its calls in flight, by the client's number, and the answers waiting to be sent.

    Answers are not bounded apart from the calls: each call in flight sends a handful (its output and
    its end; an approval asked for; more only when its caller asked for progress), and HTTP/2 flow
    control holds the client to what it reads.
    """

    def __init__(self, owner: StreamedCalls, peer: str) -> None:
        self._owner = owner
        self._peer = peer
        self.calls: dict[int, asyncio.Task[None]] = {}
        self.answers: asyncio.Queue[_Answer] = asyncio.Queue()
        self._reading = True

    async def read(self, requests: AsyncIterator[object]) -> None:
        """Begins each call the client sends, until it has sent them all."""
        async for envelope in requests:
            self._take(envelope)
        self._reading = False
        self.end_if_idle()

    def end_if_idle(self) -> None:
        """Ends the stream when nothing more will come: the client is done, or the server stops, and
        no call is in flight."""
        if not self.calls and (not self._reading or self._owner.stopping):
            self.answers.put_nowait(None)

    def _take(self, envelope: object) -> None:
        if not isinstance(envelope, pb.ExecuteStreamRequest):
            self.answers.put_nowait(_ended(0, status_of(malformed())))
            return
        number, action = envelope.call, envelope.WhichOneof("action")
        if action == "release":
            if (task := self.calls.get(number)) is not None:
                task.cancel()
            return
        refusal = self._refusal(number, action)
        if refusal is not None:
            self.answers.put_nowait(_ended(number, status_of(refusal)))
            return
        task = asyncio.create_task(self._call(number, envelope))
        self.calls[number] = task
        task.add_done_callback(lambda _: self._forget(number))

    def _refusal(
        self, number: int, action: str | None
    ) -> InvalidArgumentError | ResourceExhaustedError | UnavailableError | None:
        if action is None:
            return InvalidArgumentError([Violation("action", "name one: execute, cancel or release")])
        if number in self.calls:
            return InvalidArgumentError([Violation("call", f"call {number} is in flight on this stream")])
        if len(self.calls) >= MAX_STREAM_CALLS:
            return ResourceExhaustedError(
                [Violation("call", f"a stream holds at most {MAX_STREAM_CALLS:,} calls in flight")],
                reason="TOO_MANY_CALLS",
            )
        if action == "execute" and self._owner.stopping:
            return UnavailableError("Execute is stopping; ask again", reason="STOPPING")
        return None

    def _forget(self, number: int) -> None:
        del self.calls[number]
        self.end_if_idle()

    async def _call(self, number: int, envelope: pb.ExecuteStreamRequest) -> None:
        """Serves one call and answers how it ended; a call let go (cancelled) answers nothing more."""
        owner = self._owner
        carried = owner._carried
        if envelope.HasField("cancel"):
            request = envelope.cancel
            found = False

            async def cancel() -> None:
                nonlocal found
                found = await owner._executor.cancel_execution(request.execution_id)

            status = await carried.serve(CANCEL, envelope, request, self._peer, cancel)
            answer = pb.ExecuteStreamResponse(call=number, cancelled=pb.CancelExecutionResponse(cancelled=found))
            self.answers.put_nowait(answer if status.code == 0 else _ended(number, status))
            return
        step = envelope.execute
        counted = carried.metrics.stream_messages

        async def execute() -> None:
            correlation.bind(step.context)
            with tracing.carried(EXECUTE, envelope.trace_context):
                async for event in owner._executor.execute(step):
                    self.answers.put_nowait(pb.ExecuteStreamResponse(call=number, event=event))
                    counted[EXECUTE] += 1

        self.answers.put_nowait(_ended(number, await carried.serve(EXECUTE, envelope, step, self._peer, execute)))
