"""Sharing model calls: identical completion requests in flight share one call, and concurrent
embedding requests go out as one list.

A chat completion takes one conversation, so different completion requests are never held back for
each other: each goes out at once and its caller is answered as soon as its own call ends. Requests
with the same key (the same deterministic request) share the call in flight. An embeddings call
takes a list of texts: while one is in flight for a model, the next requests wait, for up to the
window or until a batch is full, and go out together; each caller gets its own vectors, or the
batch's error. A caller that gives up does not cancel the call others wait for.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from tierstack.server.ai.models import Completion, CompletionRequest, ModelError

T = TypeVar("T")

Send = Callable[[CompletionRequest], Awaitable[Completion]]
Embed = Callable[[Sequence[str], str], Awaitable[list[list[float]]]]


@dataclass(slots=True)
class SharingStats:
    """What was shared since the server started."""

    #: Completion requests answered by a call another request made.
    coalesced: int = 0
    #: Embedding requests, and the provider calls that answered them.
    embed_requests: int = 0
    embed_calls: int = 0


class _Owned:
    """Background calls, each owned until it ends; cancelled and awaited on close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _settle(future: asyncio.Future[T], result: T | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _retrieved(future: asyncio.Future[T]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved here: every caller may have given up


class Coalescer:
    """Shares one call among identical completion requests in flight.

    Args:
        send: Makes one call to a model.
        stats: Where sharing is counted.
    """

    def __init__(self, send: Send, stats: SharingStats) -> None:
        self._send = send
        self._stats = stats
        self._flights: dict[str, asyncio.Future[Completion]] = {}
        self._owned = _Owned()

    async def submit(self, key: str, request: CompletionRequest) -> Completion:
        """Returns the answer to ``request``, from its own call or from the identical one in flight.

        Raises:
            ModelError: The call that answers it failed.
        """
        future = self._flights.get(key)
        if future is not None:
            self._stats.coalesced += 1
            return dataclasses.replace(await asyncio.shield(future), cached=True)  # paid for by the first caller
        future = self._flights[key] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieved)
        self._owned.start(self._fly(key, future, request))
        return await asyncio.shield(future)

    async def _fly(self, key: str, future: asyncio.Future[Completion], request: CompletionRequest) -> None:
        try:
            _settle(future, await self._send(request))
        except Exception as exc:  # every caller gets it
            _settle(future, exc)
        finally:
            del self._flights[key]

    async def close(self) -> None:
        """Cancels the calls in flight (their callers' too) and waits for them to end."""
        for future in self._flights.values():
            future.cancel()
        await self._owned.close()


@dataclass(slots=True)
class _Queue:
    waiting: list[tuple[Sequence[str], asyncio.Future[list[list[float]]]]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    in_flight: int = 0


class EmbeddingBatcher:
    """Groups concurrent embedding requests for one model into one call.

    Args:
        embed: Makes one embeddings call (texts, model).
        stats: Where requests and calls are counted.
        size: The most requests of one call.
        window: How long a request may wait for its batch to fill, in seconds.
    """

    def __init__(self, embed: Embed, stats: SharingStats, *, size: int = 10, window: float = 0.1) -> None:
        self._embed = embed
        self._stats = stats
        self._size = max(size, 1)
        self._window = window
        self._models: dict[str, _Queue] = {}
        self._unsettled: set[asyncio.Future[list[list[float]]]] = set()  # every caller's, until answered
        self._closed = False
        self._owned = _Owned()

    async def submit(self, texts: Sequence[str], model: str) -> list[list[float]]:
        """Returns one vector per text, made alone or with other requests.

        Raises:
            ModelError: The call that answers it failed.
        """
        self._stats.embed_requests += 1
        future: asyncio.Future[list[list[float]]] = asyncio.get_running_loop().create_future()
        self._unsettled.add(future)
        future.add_done_callback(self._unsettled.discard)
        future.add_done_callback(_retrieved)
        queue = self._models.setdefault(model, _Queue())
        queue.waiting.append((texts, future))
        if queue.in_flight == 0 or len(queue.waiting) >= self._size:
            self._flush(model)
        elif queue.timer is None:
            queue.timer = asyncio.get_running_loop().call_later(self._window, self._flush, model)
        return await asyncio.shield(future)

    def _flush(self, model: str) -> None:
        queue = self._models[model]
        if queue.timer is not None:
            queue.timer.cancel()
            queue.timer = None
        batch, queue.waiting = queue.waiting[: self._size], queue.waiting[self._size :]
        if not batch:
            return
        queue.in_flight += 1
        self._stats.embed_calls += 1
        self._owned.start(self._fly(model, batch))
        if queue.waiting:  # more than a batch waited: the rest goes out after its own window
            queue.timer = asyncio.get_running_loop().call_later(self._window, self._flush, model)

    async def _fly(self, model: str, batch: list[tuple[Sequence[str], asyncio.Future[list[list[float]]]]]) -> None:
        try:
            sent = [text for texts, _ in batch for text in texts]
            vectors = await self._embed(sent, model)
            if len(vectors) != len(sent):
                message = f"{len(vectors)} vectors came back for {len(sent)} texts"
                raise ModelError("MODEL_ANSWER_INVALID", message, transient=False)
            start = 0
            for texts, future in batch:
                _settle(future, vectors[start : start + len(texts)])
                start += len(texts)
        except Exception as exc:  # every caller of the batch gets it
            for _, future in batch:
                _settle(future, exc)
        finally:
            queue = self._models[model]
            queue.in_flight -= 1
            if queue.in_flight == 0 and queue.waiting and not self._closed:
                self._flush(model)
            elif queue.in_flight == 0 and queue.timer is None:
                del self._models[model]  # callers name models: only those with requests in flight are kept

    async def close(self) -> None:
        """Cancels the calls in flight and the requests waiting (their callers' too), and waits for
        the calls to end."""
        self._closed = True
        for queue in self._models.values():
            if queue.timer is not None:
                queue.timer.cancel()
            queue.waiting.clear()
        for future in list(self._unsettled):
            future.cancel()
        await self._owned.close()
