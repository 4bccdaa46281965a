"""The request batcher: concurrent model requests grouped by model and sent together.

A request for a model with nothing in flight goes out at once. While a model has calls in flight,
its new requests wait, for up to the window or until a batch is full, and then go out as one batch.
Requests with the same key waiting or in flight share one call. Each caller gets its own
answer or its own error; a caller that gives up does not cancel the call others wait for.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tierstack.server.ai.models import Completion, CompletionRequest

Send = Callable[[CompletionRequest], Awaitable[Completion]]


@dataclass(slots=True)
class BatcherStats:
    """What the batcher did since the server started."""

    coalesced: int = 0
    batches: int = 0


@dataclass(slots=True)
class _Model:
    queue: list[tuple[str, CompletionRequest]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    in_flight: int = 0


class Batcher:
    """Groups requests by model.

    Args:
        send: Makes one call to a model.
        size: The most requests of one batch.
        window: How long a request may wait for its batch to fill, in seconds.
    """

    def __init__(self, send: Send, *, size: int = 10, window: float = 0.1) -> None:
        self._send = send
        self._size = max(size, 1)
        self._window = window
        self._models: dict[str, _Model] = {}
        self._waiting: dict[str, asyncio.Future[Completion]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats = BatcherStats()

    async def submit(self, key: str, request: CompletionRequest) -> Completion:
        """Returns the answer to ``request``, made alone or in a batch.

        Raises:
            ModelError: The call that answers it failed.
        """
        future = self._waiting.get(key)
        if future is None:
            future = self._waiting[key] = asyncio.get_running_loop().create_future()
            future.add_done_callback(lambda done: self._settled(key, done))
            model = self._models.setdefault(request.model, _Model())
            model.queue.append((key, request))
            if model.in_flight == 0 or len(model.queue) >= self._size:
                self._flush(request.model)
            elif model.timer is None:
                model.timer = asyncio.get_running_loop().call_later(self._window, self._flush, request.model)
            return await asyncio.shield(future)
        self.stats.coalesced += 1
        return dataclasses.replace(await asyncio.shield(future), cached=True)  # paid for by the first caller

    def _settled(self, key: str, future: asyncio.Future[Completion]) -> None:
        self._waiting.pop(key, None)
        if not future.cancelled():
            future.exception()  # retrieved here: every caller may have given up

    def _flush(self, name: str) -> None:
        model = self._models[name]
        if model.timer is not None:
            model.timer.cancel()
            model.timer = None
        batch, model.queue = model.queue[: self._size], model.queue[self._size :]
        if not batch:
            return
        self.stats.batches += 1
        model.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._dispatch(name, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if model.queue:  # more than a batch waited: the rest goes out after its own window
            model.timer = asyncio.get_running_loop().call_later(self._window, self._flush, name)

    async def _dispatch(self, name: str, batch: list[tuple[str, CompletionRequest]]) -> None:
        results = await asyncio.gather(*(self._send(request) for _, request in batch), return_exceptions=True)
        for (key, _), result in zip(batch, results, strict=True):
            future = self._waiting.get(key)
            if future is None or future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        model = self._models[name]
        model.in_flight -= 1
        if model.in_flight == 0 and model.queue:
            self._flush(name)
        elif model.in_flight == 0 and model.timer is None:
            del self._models[name]  # callers name models: only those with requests in flight are kept

    async def close(self) -> None:
        """Cancels the batches in flight and waits for them to end."""
        for model in self._models.values():
            if model.timer is not None:
                model.timer.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for future in list(self._waiting.values()):
            if not future.done():
                future.cancel()
