"""Calls carried many at once over one long-lived stream (ExecuteStream, WatchRuns): how a tier reaches
the tier below without setting up a call per step or per run. Both sides are here: the server's, which
serves each carried call as the RPC it stands for, and the client's, which keeps a few streams open and
spreads its calls over them.

Such a stream's requests share one shape: a ``call`` number of the client's choosing, the
``trace_context``, ``tenant`` and ``caller`` of the call, and an ``action`` (a call of some kind begun,
or ``release`` to let one in flight go). Its answers name their ``call`` and carry a ``result``; a
call's last answer is ``ended``, the status it ended with. Each side tells the other the largest
message it takes (``x-tierstack-max-message-bytes``, in the stream's metadata and in the server's
initial metadata), so that a message too large for the other side fails its own call alone, never the
stream and the calls it carries.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2
from opentelemetry.trace import Status, StatusCode

from tierstack.client.defaults import MAX_STREAM_CALLS
from tierstack.client.errors import from_status, translate_errors
from tierstack.core import tracing
from tierstack.core.errors import (
    ERROR_DOMAIN,
    InvalidArgumentError,
    ResourceExhaustedError,
    TierstackError,
    UnavailableError,
    Violation,
)
from tierstack.server.auth import audit
from tierstack.server.auth.principal import current as current_principal
from tierstack.server.interceptor import CarriedCalls, malformed
from tierstack.server.metrics import MethodMetrics
from tierstack.server.status import status_of
from tierstack.v1 import common_pb2

#: The RPCs the carried calls stand for.
EXECUTE = "/tierstack.v1.ExecutorService/Execute"
CANCEL_EXECUTION = "/tierstack.v1.ExecutorService/CancelExecution"
WATCH_RUN = "/tierstack.v1.OrchestratorService/WatchRun"
#: The metadata in which each side of a stream says the largest message it takes, in bytes.
LIMIT_KEY = "x-tierstack-max-message-bytes"


def _limit(metadata: Iterable[tuple[str, Any]] | None, own: int) -> int:
    """Returns the smaller of ``own`` and the limit the other side states in ``metadata`` (``own`` when
    it states none that makes sense)."""
    stated = dict(metadata or ()).get(LIMIT_KEY)
    if isinstance(stated, str) and stated.isdigit() and len(stated) < 12:
        return max(1, min(own, int(stated)))
    return own


# ---------------------------------------------------------------------------------------------------
# The server's side

#: Serves one carried call: given its number and its request, yields its answers (its end aside).
Serve = Callable[[int, Any], AsyncIterator[Message]]
#: The most calls all the streams of one RPC hold in flight on a server.
MAX_SERVER_CALLS = 4 * MAX_STREAM_CALLS
#: How many bytes of answers one stream queues before its calls (and its reading) wait for the client
#: to read: a client that does not read holds back its own stream alone.
MAX_QUEUED_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of call a stream carries.

    Attributes:
        method: The RPC the call stands for (its metrics, audit, role and spans are that RPC's).
        serve: Serves it.
        refused_when_stopping: Whether a stopping server refuses new calls of the kind UNAVAILABLE
            (to be asked for again elsewhere or later) rather than serving them.
    """

    method: str
    serve: Serve
    refused_when_stopping: bool = False


class Multiplexer:
    """Serves every stream of one RPC on a server, and ends them all once the server stops.

    Args:
        request: The stream's request message type.
        answer: The stream's answer message type.
        kinds: How each action of the requests is served, by the action's field name.
        carried: Admits, times and audits each call as the server's interceptor does a call of its own.
        max_message_bytes: The largest message the server takes and sends.
    """

    def __init__(
        self,
        request: type[Message],
        answer: Callable[..., Message],
        kinds: Mapping[str, Kind],
        carried: CarriedCalls,
        *,
        max_message_bytes: int,
    ) -> None:
        self._request = request
        self._answer = answer
        self._kinds = kinds
        self._carried = carried
        self._max_message_bytes = max_message_bytes
        self._streams: set[_Served] = set()
        self._in_flight = 0
        self.stopping = False

    def stop(self) -> None:
        """Refuses new calls of the kinds that say so from now on, and ends each stream once its calls
        in flight have ended."""
        self.stopping = True
        for stream in self._streams:
            stream.end_if_idle()

    async def serve(
        self, requests: AsyncIterator[object], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        """Serves one stream: reads its calls, and yields their answers as they come. The stream's
        credential is checked again for each call it carries."""
        metadata = tuple(context.invocation_metadata() or ())
        await context.send_initial_metadata(((LIMIT_KEY, str(self._max_message_bytes)),))
        stream = _Served(self, audit.peer_of(context), metadata, _limit(metadata, self._max_message_bytes))
        self._streams.add(stream)
        reader = asyncio.create_task(stream.read(requests), name="tierstack-stream-reader")
        stream.end_if_idle()  # a stream opened while the server stops carries nothing
        try:
            while (queued := await stream.answers.get()) is not None:
                answer, size = queued
                stream.sent(size)
                yield answer
        finally:
            self._streams.discard(stream)
            tasks = [reader, *stream.calls.values(), *stream.winding]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _ended(self, number: int, status: status_pb2.Status) -> Message:
        ended = common_pb2.CallStatus(code=status.code, message=status.message, details=status.details)
        return self._answer(call=number, ended=ended)


class _Served:
    """One stream: its calls in flight, by the client's number, and the answers waiting to be sent
    (at most ``MAX_QUEUED_BYTES`` of them, and one more)."""

    def __init__(self, owner: Multiplexer, peer: str, metadata: Sequence[tuple[str, Any]], limit: int) -> None:
        self._owner = owner
        self._peer = peer
        self._metadata = metadata
        self._limit = limit  # the largest answer both sides take
        self.calls: dict[int, asyncio.Task[None]] = {}
        self.winding: set[asyncio.Task[None]] = set()  # calls let go, still unwinding
        self.answers: asyncio.Queue[tuple[Message, int] | None] = asyncio.Queue()  # None ends the stream
        self._queued = 0
        self._drained = asyncio.Event()
        self._reading = True
        self._ending = False

    async def read(self, requests: AsyncIterator[object]) -> None:
        """Begins each call the client sends, until it has sent them all (or the stream broke)."""
        try:
            async for envelope in requests:
                await self._take(envelope)
        finally:
            self._reading = False
            self.end_if_idle()

    def end_if_idle(self) -> None:
        """Ends the stream when nothing more will come: the client is done, or the server stops, and
        no call is in flight. Calls that come after are refused."""
        if not self._ending and not self.calls and (not self._reading or self._owner.stopping):
            self._ending = True
            self.answers.put_nowait(None)

    async def send(self, answer: Message) -> None:
        """Queues an answer, once the answers queued before it hold less than ``MAX_QUEUED_BYTES``.

        Raises:
            ResourceExhaustedError: The answer is larger than a message may be, for either side.
        """
        size = answer.ByteSize()
        if size > self._limit:
            raise ResourceExhaustedError(
                [Violation("answer", f"has {size:,} bytes; a message may have {self._limit:,}")],
                reason="ANSWER_TOO_LARGE",
            )
        while self._queued > MAX_QUEUED_BYTES:
            self._drained.clear()
            await self._drained.wait()
        self._queued += size
        self.answers.put_nowait((answer, size))

    def sent(self, size: int) -> None:
        """Counts an answer taken from the queue to be written."""
        self._queued -= size
        if self._queued <= MAX_QUEUED_BYTES:
            self._drained.set()

    async def _take(self, envelope: object) -> None:
        owner = self._owner
        if not isinstance(envelope, owner._request):
            await self.send(owner._ended(0, status_of(malformed())))
            return
        number: int = envelope.call  # type: ignore[attr-defined]
        action = envelope.WhichOneof("action")
        if action == "release":
            if (task := self.calls.pop(number, None)) is not None:  # its number is free from now on
                owner._in_flight -= 1
                self.winding.add(task)
                task.cancel()
            return
        kind = owner._kinds.get(action) if action is not None else None
        refusal = self._refusal(number, kind)
        if refusal is not None:
            await self.send(owner._ended(number, status_of(refusal)))
            return
        assert kind is not None and action is not None
        task = asyncio.create_task(self._call(number, envelope, kind, getattr(envelope, action)))
        self.calls[number] = task
        owner._in_flight += 1
        task.add_done_callback(lambda _: self._forget(number, task))

    def _refusal(self, number: int, kind: Kind | None) -> TierstackError | None:
        owner = self._owner
        if kind is None:
            actions = ", ".join((*owner._kinds, "release"))
            return InvalidArgumentError([Violation("action", f"name one: {actions}")])
        if number in self.calls:
            return InvalidArgumentError([Violation("call", f"call {number} is in flight on this stream")])
        if len(self.calls) >= MAX_STREAM_CALLS or owner._in_flight >= MAX_SERVER_CALLS:
            return ResourceExhaustedError(
                [
                    Violation(
                        "call",
                        f"a stream holds at most {MAX_STREAM_CALLS:,} calls in flight, all its streams "
                        f"{MAX_SERVER_CALLS:,}",
                    )
                ],
                reason="TOO_MANY_CALLS",
            )
        if self._ending or (kind.refused_when_stopping and owner.stopping):
            return UnavailableError("the server is stopping; ask again", reason="STOPPING")
        return None

    def _forget(self, number: int, task: asyncio.Task[None]) -> None:
        if self.calls.get(number) is task:
            del self.calls[number]
            self._owner._in_flight -= 1
        self.winding.discard(task)
        self.end_if_idle()

    async def _call(self, number: int, envelope: Any, kind: Kind, request: Message) -> None:
        """Serves one call and answers how it ended; a call let go (cancelled) answers nothing more."""
        owner = self._owner
        counted = owner._carried.metrics.stream_messages

        async def behavior() -> None:
            with tracing.carried(kind.method, envelope.trace_context):
                async for answer in kind.serve(number, request):
                    await self.send(answer)
                    counted[kind.method] += 1

        status = await owner._carried.serve(
            kind.method,
            envelope,
            request,
            self._peer,
            behavior,
            credentials=self._metadata,
            tenant=envelope.tenant,
            caller=envelope.caller,
        )
        await self.send(owner._ended(number, status))


# ---------------------------------------------------------------------------------------------------
# The client's side

#: Opens one stream of the RPC with the given metadata (grpc.aio's stream-stream call, written to and
#: read from).
Opener = Callable[..., grpc.aio.StreamStreamCall[Any, Any]]
#: How long a client uses one stream for new calls before it opens another and lets the old one end
#: with its calls: calls spread again over the replicas that serve (those added since, too).
STREAM_LIFETIME = 60.0


class Multiplexed:
    """A tier's calls to the tier below, carried over a few long-lived streams of one RPC. Each call
    goes to the open stream with the fewest in flight. A stream that breaks fails its calls UNAVAILABLE
    (the caller asks again, as after any lost call), or with the server's own refusal (of its
    credential, say). One whose server stops, or that has served ``STREAM_LIFETIME`` (while fewer than
    ``streams`` are ending so), takes no new calls and ends once its calls end; others are opened.

    Args:
        open_stream: Opens one stream.
        metrics: Where each call is recorded, per method and status code, as calls of their own are.
        streams: How many streams take calls at once (with several replicas behind the channel, each
            stream goes to one, chosen round-robin when it opens).
        max_message_bytes: The largest message the channel sends and receives; a request larger than
            this or than the server takes fails alone.
    """

    def __init__(self, open_stream: Opener, metrics: MethodMetrics, *, streams: int, max_message_bytes: int) -> None:
        self._open = open_stream
        self._metrics = metrics
        self._count = streams
        self._max_message_bytes = max_message_bytes
        self._streams: list[_Stream] = []
        self._numbers = itertools.count(1)
        self._room = asyncio.Semaphore(streams * MAX_STREAM_CALLS)
        self._closed = False

    def call(self, method: str, envelope: Any) -> Carried:
        """Returns the block of one call of ``method`` (the RPC it stands for), whose request is
        ``envelope`` without its number; iterate it for the call's answers."""
        return Carried(self, method, envelope)

    def _stream(self) -> _Stream:
        """Returns the open stream with the fewest calls in flight, opening one while fewer take calls
        than wanted.

        Raises:
            UnavailableError: The client was closed.
        """
        if self._closed:
            raise UnavailableError("the client was closed", reason="CLIENT_CLOSED")
        self._streams = [stream for stream in self._streams if not stream.finished]
        now = time.monotonic()
        ending = sum(stream.draining for stream in self._streams)
        taking = []
        for stream in self._streams:
            if not stream.alive or stream.draining:
                continue
            if now - stream.opened > STREAM_LIFETIME and ending < self._count:
                stream.drain()
                ending += 1
            else:
                taking.append(stream)
        if len(taking) < self._count:
            stream = _Stream(self._open, self._max_message_bytes)
            self._streams.append(stream)
            return stream
        return min(taking, key=lambda stream: len(stream.inboxes))

    async def close(self) -> None:
        """Closes every stream; calls begun after this fail UNAVAILABLE."""
        self._closed = True
        streams, self._streams = self._streams, []
        for stream in streams:
            await stream.close()


class _Stream:
    """One stream: the calls it carries, by number, and the requests waiting to be written."""

    def __init__(self, open_stream: Opener, max_message_bytes: int) -> None:
        self.inboxes: dict[int, _Inbox] = {}  # answers, or a failure (a TierstackError)
        self._outbox: asyncio.Queue[Message | None] = asyncio.Queue()  # None: the client is done writing
        self._max_message_bytes = max_message_bytes
        self.alive = True
        self.draining = False
        self.opened = time.monotonic()
        # Opened outside any caller's context: the stream is for no one tenant, caller or trace.
        self._task = asyncio.create_task(self._run(open_stream), name="tierstack-stream", context=contextvars.Context())

    @property
    def finished(self) -> bool:
        return self._task.done()

    def send(self, message: Message) -> None:
        self._outbox.put_nowait(message)

    def drain(self) -> None:
        """Takes no new calls, and ends once the calls in flight have ended."""
        self.draining = True
        self.end_if_idle()

    def end_if_idle(self) -> None:
        """Tells the server that nothing more will come, once a draining stream carries no call."""
        if self.draining and not self.inboxes:
            self._outbox.put_nowait(None)

    async def _run(self, open_stream: Opener) -> None:
        writer: asyncio.Task[None] | None = None
        call: grpc.aio.StreamStreamCall[Any, Any] | None = None
        failure: TierstackError = UnavailableError("the stream was closed", reason="STREAM_CLOSED")
        try:
            call = open_stream(metadata=((LIMIT_KEY, str(self._max_message_bytes)),))
            writer = asyncio.create_task(self._write(call), name="tierstack-stream-writer")
            with translate_errors():
                while True:
                    answer: Any = await call.read()
                    if answer is grpc.aio.EOF:
                        break
                    inbox = self.inboxes.get(answer.call)
                    if inbox is not None:  # else let go
                        inbox.put_nowait(answer)
            failure = UnavailableError("the server ended the stream", reason="STREAM_ENDED")
        except TierstackError as exc:
            # The server's own refusal (of the stream's credential, say) stands; anything else broke
            # the stream under calls that did nothing wrong, to be asked for again.
            failure = exc if exc.domain == ERROR_DOMAIN else UnavailableError("the stream broke", reason="STREAM_BROKE")
        except Exception:  # the channel was closed under it, say
            failure = UnavailableError("the stream broke", reason="STREAM_BROKE")
        finally:
            self.alive = False
            if call is not None:
                call.cancel()
            if writer is not None:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            for inbox in self.inboxes.values():
                inbox.put_nowait(failure)

    async def _write(self, call: grpc.aio.StreamStreamCall[Any, Any]) -> None:
        """Writes the requests in turn, each within the largest message both sides take: a larger one
        fails its own call."""
        try:
            limit = _limit(await call.initial_metadata(), self._max_message_bytes)
            while (message := await self._outbox.get()) is not None:
                if (size := message.ByteSize()) > limit:
                    if (inbox := self.inboxes.get(message.call)) is not None:  # type: ignore[attr-defined]
                        inbox.put_nowait(
                            ResourceExhaustedError(
                                [Violation("request", f"has {size:,} bytes; a message may have {limit:,}")],
                                reason="REQUEST_TOO_LARGE",
                            )
                        )
                    continue
                await call.write(message)
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the call ended: its reader tells why

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class _Inbox:
    """The answers of one call waiting to be read by its one reader: a list and, while the reader
    waits, a future (an ``asyncio.Queue`` costs about 3 KiB; a live run holds one per step in flight)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._items.pop(0)


class Carried:
    """The block of one call carried on a stream, and the iterator of its answers: numbered, named
    for its caller, traced and timed; leaving it before its end lets the call go."""

    __slots__ = ("_envelope", "_inbox", "_method", "_owner", "_span", "_start", "_stream", "ended")

    def __init__(self, owner: Multiplexed, method: str, envelope: Any) -> None:
        self._owner = owner
        self._method = method
        self._envelope = envelope
        self._inbox = _Inbox()
        self.ended = False

    async def __aenter__(self) -> Carried:
        """Sends the call.

        Raises:
            UnavailableError: The client was closed.
        """
        owner = self._owner
        await owner._room.acquire()
        try:
            self._stream = owner._stream()
        except UnavailableError:
            owner._room.release()
            raise
        owner._metrics.in_flight[self._method] += 1
        self._start = time.perf_counter()
        envelope = self._envelope
        envelope.call = next(owner._numbers)
        if (principal := current_principal()) is not None:
            envelope.tenant, envelope.caller = principal.tenant, principal.subject
        self._stream.inboxes[envelope.call] = self._inbox
        self._span = tracing.carry(self._method, envelope.trace_context)
        self._stream.send(envelope)
        return self

    def __aiter__(self) -> Carried:
        return self

    async def __anext__(self) -> Any:
        """Returns the call's next answer; ends with the call, raising its failure or the stream's."""
        if self.ended:
            raise StopAsyncIteration
        answer = await self._inbox.get()
        if isinstance(answer, TierstackError):
            self.ended = True
            raise answer
        if answer.WhichOneof("result") == "ended":
            self.ended = True
            if answer.ended.code:
                failure = from_status(answer.ended.code, answer.ended.message, answer.ended.details)
                if failure.reason == "STOPPING":
                    self._stream.drain()  # its server stops: new calls go to another stream
                raise failure
            raise StopAsyncIteration
        self._owner._metrics.stream_messages[self._method] += 1
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
        else:
            code = "OK" if error is None else "UNKNOWN"
        if not self.ended and stream.alive:
            stream.send(type(self._envelope)(call=number, release=empty_pb2.Empty()))
        stream.end_if_idle()
        owner = self._owner
        owner._metrics.in_flight[self._method] -= 1
        owner._metrics.record(self._method, code, time.perf_counter() - self._start)
        if self._span is not None:
            if code != "OK":
                self._span.set_status(Status(StatusCode.ERROR, code))
            self._span.end()
        owner._room.release()
