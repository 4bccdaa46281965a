"""No-op tool calls through ExecutorService against a bare grpc.aio echo server.

Both servers run in their own processes under uvloop; one client process drives both with the same
request bytes, at concurrency 1 and 16, and prints requests/s, p50 and p99 with the ratios. Then
batches, and the interceptors' own cost per call beside the no-op call it is part of; last, what the
hop to a worker process adds to a trivial template or query.

Usage: ``python -m tools.bench.bench_execute [--requests N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import uvloop

from tierstack.client import ExecutorClient
from tierstack.core.values import to_struct
from tierstack.server import Settings
from tierstack.server.execute.registry import WorkerFunction
from tierstack.server.execute.service import ExecuteService
from tierstack.server.execute.workers import capped_value
from tierstack.server.interceptor import ServerInterceptor, UnaryClientInterceptor
from tierstack.server.metrics import MethodMetrics
from tierstack.v1 import common_pb2, executor_service_pb2
from tools.bench.echo_server import METHOD as ECHO_METHOD
from tools.bench.processes import serving
from tools.bench.results import Results
from tools.bench.timing import interleaved, timed

HERE = Path(__file__).resolve().parent
READY = re.compile(rb"serving on (\S+)")
ROUNDS = 3


@dataclass(frozen=True)
class Result:
    """The figures of one series of calls."""

    requests_per_second: float
    p50_ms: float
    p99_ms: float
    latencies: list[float] = field(default_factory=list, compare=False)


def median(results: list[Result]) -> Result:
    """Returns the median of each figure over several rounds."""
    return Result(
        statistics.median(r.requests_per_second for r in results),
        statistics.median(r.p50_ms for r in results),
        statistics.median(r.p99_ms for r in results),
        [latency for r in results for latency in r.latencies],
    )


async def measure(call: Callable[[], Awaitable[object]], *, requests: int, concurrency: int) -> Result:
    """Issues ``requests`` calls from ``concurrency`` workers after a warm-up, timing each one."""
    for _ in range(200):
        await call()
    latencies: list[float] = []
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    cuts = statistics.quantiles(latencies, n=100)
    return Result(len(latencies) / elapsed, cuts[49] * 1e3, cuts[98] * 1e3, latencies)


async def main(requests: int, results: Results) -> None:
    request = executor_service_pb2.ExecuteToolRequest(
        call=common_pb2.ToolCall(tool="core.echo", arguments=to_struct({"value": "x" * 64}))
    )
    payload = request.SerializeToString()
    async with (
        serving(sys.executable, "-m", "tierstack.cli", "serve", "execute", "--port", "0") as (execute_target, _),
        serving(sys.executable, str(HERE / "echo_server.py")) as (echo_target, _),
        ExecutorClient(execute_target) as client,
        grpc.aio.insecure_channel(echo_target) as channel,
    ):
        echo_call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(ECHO_METHOD)
        series: dict[str, Callable[[], Awaitable[object]]] = {
            "echo": lambda: echo_call(payload),
            "tierstack": lambda: client.execute_tool(request),
        }
        rows = []
        single: dict[str, Result] = {}
        for concurrency in (1, 16):
            rounds: dict[str, list[Result]] = {name: [] for name in series}
            for _ in range(ROUNDS):  # alternating rounds, so drift in the machine hits both alike
                for name, call in series.items():
                    result = await measure(call, requests=requests // ROUNDS, concurrency=concurrency)
                    rounds[name].append(result)
            found = {name: median(runs) for name, runs in rounds.items()}
            base = found["echo"]
            for name, result in found.items():
                rows.append(
                    (
                        concurrency,
                        name,
                        f"{result.requests_per_second:,.0f}",
                        f"{result.p50_ms:.3f}",
                        f"{result.p99_ms:.3f}",
                        f"{result.requests_per_second / base.requests_per_second:.2f}",
                        f"{result.p50_ms / base.p50_ms:.2f}",
                    )
                )
            ours = found["tierstack"]
            results.compare(f"Execute no-op call p50, c={concurrency} (vs echo)", ours.p50_ms, base.p50_ms, "ms")
            results.compare(
                f"Execute no-op calls/s, c={concurrency} (vs echo)",
                ours.requests_per_second,
                base.requests_per_second,
                "calls/s",
                lower_is_better=False,
            )
            if concurrency == 1:
                single = found
                results.samples("execute: ExecuteTool(core.echo)", ours.latencies)
                results.samples("baseline: bare grpc.aio echo", base.latencies)
        results.table(
            "Execute: no-op tool call against a bare grpc.aio echo server",
            ("concurrency", "server", "req/s", "p50 ms", "p99 ms", "req/s vs echo", "p50 vs echo"),
            rows,
            f"{len(payload)}-byte request, {requests} calls a row in {ROUNDS} alternating rounds (medians).",
        )
        await batches(client, echo_call, payload, results)
    await worker_hop(results, calls=max(requests // 10, 100))
    await interceptor_overhead(single["tierstack"].p50_ms, results)


async def batches(
    client: ExecutorClient, echo_call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes], payload: bytes, results: Results
) -> None:
    """100 no-op calls as one ExecuteTools batch, and 10 calls as one deterministic step, against the
    same calls made one by one to the echo server at the same concurrency."""
    call = common_pb2.ToolCall(tool="core.echo", arguments=to_struct({"value": "x" * 64}))
    step = executor_service_pb2.ExecuteRequest(step_id="bench", tool_calls=[call] * 10)

    async def echo_calls(count: int, concurrency: int) -> None:
        slots = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with slots:
                await echo_call(payload)

        await asyncio.gather(*(one() for _ in range(count)))

    async def batch(concurrency: int) -> None:
        request = executor_service_pb2.ExecuteToolsRequest(calls=[call] * 100, max_concurrency=concurrency)
        async for _ in client.execute_tools(request):
            pass

    async def deterministic_step() -> None:
        async for _ in client.execute(step):
            pass

    cases: list[tuple[str, int, Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]] = [
        ("ExecuteTools batch, concurrency 4", 100, lambda: batch(4), lambda: echo_calls(100, 4)),
        ("ExecuteTools batch, concurrency 64", 100, lambda: batch(64), lambda: echo_calls(100, 64)),
        ("deterministic step of 10 calls", 10, deterministic_step, lambda: echo_calls(10, 1)),
    ]
    rows = []
    for name, calls, ours, echo in cases:
        ours_seconds = await timed(ours, 30)
        echo_seconds = await timed(echo, 30)
        overhead_us = (ours_seconds - echo_seconds) / calls * 1e6
        rows.append(
            (name, calls, f"{calls / ours_seconds:,.0f}", f"{calls / echo_seconds:,.0f}", f"{overhead_us:+,.0f} µs")
        )
        results.compare(
            f"{name}: calls/s (vs one echo RPC per call)",
            calls / ours_seconds,
            calls / echo_seconds,
            "calls/s",
            lower_is_better=False,
        )
    results.table(
        "Execute: batches against the same calls made one RPC each to the echo server",
        ("work", "calls", "tierstack calls/s", "echo calls/s", "overhead per call"),
        rows,
    )


class _Context:
    """The little of a servicer context the server interceptor reads on a call that succeeds (and
    audits: a call that acts on something names its peer)."""

    def code(self) -> None:
        return None

    def peer_identities(self) -> None:
        return None


class _Call:
    """A finished client call: awaiting it gives its response."""

    def __await__(self) -> Generator[Any, None, bytes]:
        return b"response"
        yield


async def interceptor_overhead(call_p50_ms: float, results: Results, calls: int = 200_000) -> None:
    """Times the server and client interceptors around a call that does nothing, against the bare
    call, in process; reports their cost as a share of a no-op ExecuteTool call's p50."""
    server = ServerInterceptor(MethodMetrics())
    client = UnaryClientInterceptor(MethodMetrics())
    context: Any = _Context()
    details: Any = grpc.aio.ClientCallDetails("/tierstack.v1.ExecutorService/ExecuteTool", None, None, None, None)

    async def behavior(request: bytes, context: Any) -> bytes:
        return request

    async def continuation(details: Any, request: bytes) -> _Call:
        return _Call()

    wrapped = server._wrap_unary("/tierstack.v1.ExecutorService/ExecuteTool", behavior)

    async def loop(one: Callable[[], Awaitable[object]]) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            await one()
        return (time.perf_counter() - start) / calls

    async def bare_client() -> bytes:
        return await (await continuation(details, b""))

    samples: dict[str, list[float]] = {"bare": [], "server": [], "client": [], "bare client": []}
    for _ in range(5):  # alternating rounds
        samples["bare"].append(await loop(lambda: behavior(b"", context)))
        samples["server"].append(await loop(lambda: wrapped(b"", context)))
        samples["bare client"].append(await loop(bare_client))
        samples["client"].append(await loop(lambda: client.intercept_unary_unary(continuation, details, b"")))
    server_us = (statistics.median(samples["server"]) - statistics.median(samples["bare"])) * 1e6
    client_us = (statistics.median(samples["client"]) - statistics.median(samples["bare client"])) * 1e6
    call_us = call_p50_ms * 1000
    results.table(
        "Interceptors: their own cost per call, against a no-op ExecuteTool call",
        ("interceptor", "µs per call", "share of a no-op call's p50"),
        [
            ("server (histogram, in flight, status mapping)", f"{server_us:.2f}", f"{server_us / call_us:.2%}"),
            ("client (the same, on the caller's side)", f"{client_us:.2f}", f"{client_us / call_us:.2%}"),
        ],
        f"Measured in process over {calls:,} calls in 5 alternating rounds; the no-op call's p50 at "
        f"concurrency 1 is {call_p50_ms:.3f} ms (goal: under 5 %).",
    )


async def worker_hop(results: Results, calls: int) -> None:
    """Times trivial text.template and json.query calls run in process against the same calls run
    in Execute's worker pool: what the hop to a killable worker process adds to a call."""
    service = ExecuteService(Settings(worker_processes=1))
    await service.workers.start()  # the pool alone: no server, no stores
    context = service.executor.context(common_pb2.RequestContext(correlation_id="bench"))
    limit = Settings().max_output_bytes
    calls_by_tool = {
        "text.template": {"template": "Hello {{ who }}", "variables": {"who": "Ada"}},
        "json.query": {"data": {"people": [{"name": "Ada"}, {"name": "Alan"}]}, "expression": "people[].name"},
    }

    async def both_ways(function: WorkerFunction, arguments: dict[str, Any]) -> dict[str, list[float]]:
        async def in_process() -> object:
            return capped_value(function(arguments, context), limit)

        async def in_pool() -> object:
            return await service.workers.run(function, arguments, context, timeout=30.0)

        return await interleaved({"in process": in_process, "in the pool": in_pool}, calls)

    rows = []
    try:
        for name, arguments in calls_by_tool.items():
            tool = service.registry.get(name)
            assert tool is not None and tool.function is not None
            samples = await both_ways(tool.function, arguments)
            local, pooled = (statistics.median(samples[key]) * 1e3 for key in ("in process", "in the pool"))
            rows.append((name, f"{local:.3f}", f"{pooled:.3f}", f"{pooled - local:.3f}"))
            results.samples(f"execute: {name} in the worker pool", samples["in the pool"])
    finally:
        await service.close()
    results.table(
        "Execute: the cost of running a tool call in a worker process",
        ("tool", "p50 in process, ms", "p50 in the pool, ms", "added by the hop, ms"),
        rows,
        f"A trivial call, {calls} times each way in alternating order, one worker, no gRPC.",
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=9000)
    parser.add_argument("--json", type=Path, help="also write the findings here, for the report")
    arguments = parser.parse_args()
    found = Results()
    uvloop.run(main(arguments.requests, found))
    found.save(arguments.json)
