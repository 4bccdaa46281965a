"""How Orchestrate reaches Execute: every step over a few long-lived ExecuteStream calls, each carrying
many steps at once, so that a step costs two messages rather than a call of its own."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import time
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import cast

import grpc
from google.protobuf import empty_pb2
from opentelemetry.trace import Status, StatusCode

from tierstack.client.defaults import MAX_STREAM_CALLS
from tierstack.client.errors import from_status, translate_errors
from tierstack.core import tracing
from tierstack.core.errors import DeadlineExceededError, InternalError, TierstackError, UnavailableError
from tierstack.server.metrics import MethodMetrics
from tierstack.v1 import executor_service_pb2 as pb
from tierstack.v1 import executor_service_pb2_grpc

EXECUTE = "/tierstack.v1.ExecutorService/Execute"
CANCEL = "/tierstack.v1.ExecutorService/CancelExecution"
#: How many streams are kept open to Execute (to each of its replicas, roughly, when there are several:
#: each stream goes to one, chosen round-robin when it opens).
DEFAULT_STREAMS = 4

_Inbound = pb.ExecuteStreamResponse | TierstackError  # an answer, or the stream's failure
_StreamCall = grpc.aio.StreamStreamCall[pb.ExecuteStreamRequest, pb.ExecuteStreamResponse]


class ExecuteStreams:
    """Runs steps in Tier 3 over long-lived ExecuteStream calls (a ``StepRunner``). Each call goes to
    the open stream with the fewest in flight; a stream that fails fails its calls UNAVAILABLE (they
    are asked for again under the same execution id, as after any lost call) and is opened again on
    the next call.

    Args:
        channel: The channel to Execute (whose interceptors add the tier's key).
        metrics: Where each carried call is recorded, per method and status code, as calls of their
            own are.
        streams: How many streams are kept open.
        timeout: How long a cancellation may take, in seconds.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        metrics: MethodMetrics,
        *,
        streams: int = DEFAULT_STREAMS,
        timeout: float = 30.0,
    ) -> None:
        self._stub = executor_service_pb2_grpc.ExecutorServiceStub(channel)
        self._metrics = metrics
        self._count = streams
        self._timeout = timeout
        self._streams: list[_Stream] = []
        self._numbers = itertools.count(1)
        self._room = asyncio.Semaphore(streams * MAX_STREAM_CALLS)

    async def execute(self, request: pb.ExecuteRequest) -> AsyncIterator[pb.ExecutionEvent]:
        """Runs one step and yields its events; leaving early lets it go (it runs on in Tier 3)."""
        async with _Call(self, EXECUTE, pb.ExecuteStreamRequest(call=next(self._numbers), execute=request)) as call:
            while not call.ended:
                answer = await call.next()
                if answer.HasField("event"):
                    self._metrics.stream_messages[EXECUTE] += 1
                    yield answer.event

    async def cancel_execution(self, execution_id: str) -> bool:
        """Stops a step in flight; returns whether it was."""
        cancel = pb.CancelExecutionRequest(execution_id=execution_id)
        async with _Call(self, CANCEL, pb.ExecuteStreamRequest(call=next(self._numbers), cancel=cancel)) as call:
            try:
                async with asyncio.timeout(self._timeout):
                    answer = await call.next()
            except TimeoutError:
                raise DeadlineExceededError("Execute did not answer the cancellation in time") from None
        return answer.cancelled.cancelled

    def _stream(self) -> _Stream:
        """Returns the open stream with the fewest calls in flight, opening one while fewer are open
        than wanted."""
        self._streams = [stream for stream in self._streams if stream.alive]
        if len(self._streams) < self._count:
            stream = _Stream(self._stub)
            self._streams.append(stream)
            return stream
        return min(self._streams, key=lambda stream: len(stream.inboxes))

    async def close(self) -> None:
        """Closes every stream (steps in flight run on in Tier 3)."""
        streams, self._streams = self._streams, []
        for stream in streams:
            await stream.close()


class _Stream:
    """One ExecuteStream: the calls it carries, by number, and the messages waiting to be written."""

    def __init__(self, stub: executor_service_pb2_grpc.ExecutorServiceStub) -> None:
        self.inboxes: dict[int, asyncio.Queue[_Inbound]] = {}
        self._outbox: asyncio.Queue[pb.ExecuteStreamRequest] = asyncio.Queue()
        self.alive = True
        # Opened outside any caller's context: the stream is for no one tenant, caller or trace.
        self._task = asyncio.create_task(
            self._run(stub), name="tierstack-execute-stream", context=contextvars.Context()
        )

    def send(self, message: pb.ExecuteStreamRequest) -> None:
        self._outbox.put_nowait(message)

    async def _run(self, stub: executor_service_pb2_grpc.ExecutorServiceStub) -> None:
        # grpc.aio's stream-stream call, written to and read from (the stubs type the sync flavour).
        call = cast(Callable[[], _StreamCall], stub.ExecuteStream)()
        writer = asyncio.create_task(self._write(call), name="tierstack-execute-stream-writer")
        failure: TierstackError = UnavailableError("the stream to Execute was closed", reason="STREAM_CLOSED")
        try:
            with translate_errors():
                while isinstance(answer := await call.read(), pb.ExecuteStreamResponse):  # else EOF
                    inbox = self.inboxes.get(answer.call)
                    if inbox is not None:  # else let go, or ended
                        inbox.put_nowait(answer)
            failure = UnavailableError("Execute ended the stream", reason="STREAM_ENDED")
        except TierstackError as exc:
            failure = exc
        finally:
            self.alive = False
            call.cancel()
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            for inbox in self.inboxes.values():
                inbox.put_nowait(failure)

    async def _write(self, call: _StreamCall) -> None:
        try:
            while True:
                await call.write(await self._outbox.get())
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the call ended: its reader tells why

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class _Call:
    """The block of one call carried on a stream: numbered, traced and timed; leaving it before its
    end lets it go."""

    __slots__ = ("_envelope", "_inbox", "_method", "_owner", "_span", "_start", "_stream", "ended")

    def __init__(self, owner: ExecuteStreams, method: str, envelope: pb.ExecuteStreamRequest) -> None:
        self._owner = owner
        self._method = method
        self._envelope = envelope
        self._inbox: asyncio.Queue[_Inbound] = asyncio.Queue()
        self.ended = False

    async def __aenter__(self) -> _Call:
        owner = self._owner
        await owner._room.acquire()
        owner._metrics.in_flight[self._method] += 1
        self._start = time.perf_counter()
        self._stream = owner._stream()
        self._stream.inboxes[self._envelope.call] = self._inbox
        self._span = tracing.carry(self._method, self._envelope.trace_context)
        self._stream.send(self._envelope)
        return self

    async def next(self) -> pb.ExecuteStreamResponse:
        """Returns the call's next answer; raises the call's failure, or the stream's."""
        answer = await self._inbox.get()
        if isinstance(answer, TierstackError):
            self.ended = True
            raise answer
        kind = answer.WhichOneof("result")
        if kind == "ended":
            self.ended = True
            if answer.ended.code:
                raise from_status(answer.ended.code, answer.ended.message, answer.ended.details)
        elif (kind == "event") != (self._method == EXECUTE):
            self.ended = True
            raise InternalError("Execute answered the call with a message of another kind")
        else:
            self.ended = kind == "cancelled"
        return answer

    async def __aexit__(
        self, exc_type: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        stream, number = self._stream, self._envelope.call
        del stream.inboxes[number]
        if isinstance(error, TierstackError):
            code = error.code.name
        elif isinstance(error, asyncio.CancelledError | GeneratorExit):
            code = "CANCELLED"
            if not self.ended and stream.alive:
                stream.send(pb.ExecuteStreamRequest(call=number, release=empty_pb2.Empty()))
        else:
            code = "OK" if error is None else "UNKNOWN"
        owner = self._owner
        owner._metrics.in_flight[self._method] -= 1
        owner._metrics.record(self._method, code, time.perf_counter() - self._start)
        if self._span is not None:
            if code != "OK":
                self._span.set_status(Status(StatusCode.ERROR, code))
            self._span.end()
        owner._room.release()
