"""Worker processes for the tool calls that burn CPU or memory (templates, JSON queries, synchronous
Python tools): a call runs in a worker, where its deadline can stop it, its memory is capped and its
output is measured before it is sent back, and the event loop only waits for the answer."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import resource
import time
import traceback
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from google.protobuf import struct_pb2
from pebble import ProcessExpired, ProcessPool

from tierstack.core.errors import quoted
from tierstack.core.values import least_size, to_value
from tierstack.server.execute.registry import ToolContext, ToolError, WorkerFunction

_log = logging.getLogger(__name__)

# Workers are forked from a forkserver: a clean, single-threaded process started once, that has
# imported the tools' modules (the preload), so a replacement for a killed worker starts in
# milliseconds. Plain fork would copy a server process that runs gRPC's threads, which is unsafe;
# spawn would start a new interpreter and import everything again for every replacement.
_START = multiprocessing.get_context("forkserver")
_PRELOAD = ["tierstack.server.execute.builtin"]


@dataclass(frozen=True, slots=True)
class _Limits:
    memory_mb: int
    max_output_bytes: int


# In a worker: its limits, set when it starts.
_limits = _Limits(memory_mb=0, max_output_bytes=1 << 20)
#: The exit code of a worker that ran out of memory.
_OUT_OF_MEMORY = 75


def output_limit() -> int:
    """Returns, in a worker, the most bytes a call's output may take; tools that produce output
    bit by bit (templates) stop as soon as they pass it."""
    return _limits.max_output_bytes


def too_large(limit: int) -> ToolError:
    """Returns the error of an output over ``limit`` bytes."""
    return ToolError("OUTPUT_TOO_LARGE", f"the output exceeds {limit} bytes (TIERSTACK_MAX_OUTPUT_BYTES)")


def capped_value(output: object, limit: int) -> struct_pb2.Value:
    """Returns ``output`` as a protobuf Value.

    Raises:
        ToolError: OUTPUT_TOO_LARGE when its wire form exceeds ``limit`` bytes.
        TypeError: ``output`` is not JSON.
    """
    if least_size(output, limit) > limit:
        raise too_large(limit)
    value = to_value(output)
    if value.ByteSize() > limit:
        raise too_large(limit)
    return value


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What a worker sends back: plain data only, so nothing a tool raises can fail to unpickle in
    the server (pebble gives up on the whole pool when a result cannot be read)."""

    value: bytes = b""  # the output's wire form, a google.protobuf.Value
    reason: str = ""
    message: str = ""
    trace: str = ""  # an unexpected exception's traceback, for the server's log


def _initialise(limits: _Limits) -> None:
    """Starts a worker: caps its address space and keeps its limits."""
    global _limits
    cap = limits.memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    _limits = limits


def _invoke(function: WorkerFunction, arguments: dict[str, Any], context: ToolContext) -> _Outcome:
    """Runs one call in a worker and measures its output before it is sent."""
    try:
        value = capped_value(function(arguments, context), _limits.max_output_bytes)
        return _Outcome(value=value.SerializeToString())
    except ToolError as exc:
        return _Outcome(reason=exc.reason, message=exc.message)
    except MemoryError:
        pass  # below, once the failed call's frames have let go of its memory
    except BaseException as exc:  # SystemExit too: nothing a tool raises may reach the server
        message = f"the tool failed: {quoted(str(exc))}"
        return _Outcome(reason="TOOL_FAILED", message=message, trace=traceback.format_exc())
    # A worker that ran out of memory may keep what it could not give back (caches, fragments), so
    # it ends and pebble starts a fresh one; the server reads the exit code as this call's failure.
    # It waits a moment first, so that pebble has seen the call start and blames the exit on it.
    time.sleep(0.2)
    os._exit(_OUT_OF_MEMORY)


class WorkerPool:
    """Worker processes for tool calls a deadline must be able to stop (a pebble process pool).

    A call whose deadline passes, or whose caller goes away, has its worker killed and replaced; a
    call that needs more memory than a worker may use fails with TOOL_MEMORY_LIMIT (and its worker
    is replaced too), and one whose output is over the cap with OUTPUT_TOO_LARGE, found in the
    worker before the output is sent.

    Args:
        workers: How many calls run at once; more wait for a free worker.
        memory_mb: The address space each worker may use, in MiB (the interpreter and the tools'
            modules take about 200 of it).
        max_output_bytes: The largest output of a call, in bytes of its wire form.
    """

    def __init__(self, *, workers: int, memory_mb: int, max_output_bytes: int) -> None:
        self._workers = workers
        self._limits = _Limits(memory_mb=memory_mb, max_output_bytes=max_output_bytes)
        self._pool: ProcessPool | None = None
        self._replacing = asyncio.Lock()

    def _started(self) -> ProcessPool:
        """Returns a new pool whose workers are starting (this blocks: call it in a thread)."""
        _START.set_forkserver_preload(_PRELOAD)  # heeded when the forkserver starts, with the first pool
        pool = ProcessPool(max_workers=self._workers, initializer=_initialise, initargs=(self._limits,), context=_START)
        if not pool.active:  # asking starts the pool
            raise RuntimeError("the worker pool did not start")
        return pool

    async def start(self) -> None:
        """Starts the workers."""
        self._pool = await asyncio.to_thread(self._started)

    async def close(self) -> None:
        """Stops the workers, killing calls still running; safe to call when it never started."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()  # type: ignore[no-untyped-call]
            await asyncio.to_thread(pool.join)

    async def _running(self) -> ProcessPool:
        """Returns the pool, replacing it first if it broke: pebble gives up on the whole pool when
        a worker dies while no call runs (killed from outside, say)."""
        async with self._replacing:
            broken = self._pool
            if broken is None:
                raise ToolError("WORKERS_UNAVAILABLE", "the server is not running its worker processes")
            if broken.active:
                return broken
            _log.error("the tool worker pool broke; a new one replaces it")
            pool = self._pool = await asyncio.to_thread(self._started)
        broken.stop()  # type: ignore[no-untyped-call]
        await asyncio.to_thread(broken.join)
        return pool

    async def run(
        self, function: WorkerFunction, arguments: dict[str, Any], context: ToolContext, *, timeout: float | None
    ) -> struct_pb2.Value:
        """Runs ``function(arguments, context)`` in a worker and returns its output; the worker is
        killed when ``timeout`` seconds pass (TimeoutError) or the awaiting task is cancelled.

        Raises:
            ToolError: The tool failed, its output is too large, it ran out of memory or its worker died.
            TimeoutError: The call did not finish within ``timeout`` seconds.
        """
        pool = await self._running()
        try:
            future = pool.schedule(_invoke, args=(function, arguments, context), timeout=timeout)
            outcome: _Outcome = await asyncio.wrap_future(future)
        except ProcessExpired as exc:
            if exc.exitcode == _OUT_OF_MEMORY:
                raise ToolError(
                    "TOOL_MEMORY_LIMIT",
                    f"the call needed more than the {self._limits.memory_mb} MiB a worker may use"
                    " (TIERSTACK_WORKER_MEMORY_MB)",
                ) from None
            raise ToolError(
                "WORKER_DIED", f"the worker process running the call stopped unexpectedly (exit code {exc.exitcode})"
            ) from None
        except (BrokenProcessPool, RuntimeError):  # the pool broke: the next call replaces it
            raise ToolError("WORKER_DIED", "the worker processes stopped unexpectedly; new ones are starting") from None
        if outcome.trace:
            _log.error("a tool call failed in its worker\n%s", outcome.trace)
        if outcome.reason:
            raise ToolError(outcome.reason, outcome.message)
        return struct_pb2.Value.FromString(outcome.value)
