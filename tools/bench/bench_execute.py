"""No-op tool calls through ExecutorService against a bare grpc.aio echo server.

Both servers run in their own processes under uvloop; one client process drives both with the same
request bytes, at concurrency 1 and 16, and prints requests/s, p50 and p99 with the ratios.

Usage: ``python -m tools.bench.bench_execute [--requests N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import uvloop

from tierstack.client import ExecutorClient
from tierstack.client.values import to_struct
from tierstack.v1 import common_pb2, executor_service_pb2
from tools.bench.echo_server import METHOD as ECHO_METHOD
from tools.bench.processes import serving
from tools.bench.timing import timed

HERE = Path(__file__).resolve().parent
READY = re.compile(rb"serving on (\S+)")
ROUNDS = 3


@dataclass(frozen=True)
class Result:
    """The figures of one series of calls."""

    requests_per_second: float
    p50_ms: float
    p99_ms: float


def median(results: list[Result]) -> Result:
    """Returns the median of each figure over several rounds."""
    return Result(
        statistics.median(r.requests_per_second for r in results),
        statistics.median(r.p50_ms for r in results),
        statistics.median(r.p99_ms for r in results),
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
    return Result(len(latencies) / elapsed, cuts[49] * 1e3, cuts[98] * 1e3)


async def main(requests: int) -> None:
    request = executor_service_pb2.ExecuteToolRequest(
        call=common_pb2.ToolCall(tool="core.echo", arguments=to_struct({"value": "x" * 64}))
    )
    payload = request.SerializeToString()
    async with (
        serving(sys.executable, "-m", "tierstack.cli", "serve", "execute", "--port", "0") as execute_target,
        serving(sys.executable, str(HERE / "echo_server.py")) as echo_target,
        ExecutorClient(execute_target) as client,
        grpc.aio.insecure_channel(echo_target) as channel,
    ):
        echo_call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(ECHO_METHOD)
        series: dict[str, Callable[[], Awaitable[object]]] = {
            "echo": lambda: echo_call(payload),
            "tierstack": lambda: client.execute_tool(request),
        }
        print(
            f"no-op tool call vs bare grpc.aio echo: {len(payload)}-byte request, {requests} calls a row"
            f" in {ROUNDS} alternating rounds (medians)\n"
        )
        print("| concurrency | server | req/s | p50 ms | p99 ms | req/s vs echo | p50 vs echo |")
        print("|---:|---|---:|---:|---:|---:|---:|")
        for concurrency in (1, 16):
            rounds: dict[str, list[Result]] = {name: [] for name in series}
            for _ in range(ROUNDS):  # alternating rounds, so drift in the machine hits both alike
                for name, call in series.items():
                    result = await measure(call, requests=requests // ROUNDS, concurrency=concurrency)
                    rounds[name].append(result)
            results = {name: median(found) for name, found in rounds.items()}
            base = results["echo"]
            for name, result in results.items():
                print(
                    f"| {concurrency} | {name} | {result.requests_per_second:,.0f} | {result.p50_ms:.3f} | "
                    f"{result.p99_ms:.3f} | {result.requests_per_second / base.requests_per_second:.2f} | "
                    f"{result.p50_ms / base.p50_ms:.2f} |"
                )
        await batches(client, echo_call, payload)


async def batches(
    client: ExecutorClient, echo_call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes], payload: bytes
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

    print("\n| work | calls | tierstack calls/s | echo calls/s (same calls, one RPC each) | overhead per call |")
    print("|---|---:|---:|---:|---:|")
    cases: list[tuple[str, int, Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]] = [
        ("ExecuteTools batch, concurrency 4", 100, lambda: batch(4), lambda: echo_calls(100, 4)),
        ("ExecuteTools batch, concurrency 64", 100, lambda: batch(64), lambda: echo_calls(100, 64)),
        ("deterministic step of 10 calls", 10, deterministic_step, lambda: echo_calls(10, 1)),
    ]
    for name, calls, ours, echo in cases:
        ours_seconds = await timed(ours, 30)
        echo_seconds = await timed(echo, 30)
        overhead_us = (ours_seconds - echo_seconds) / calls * 1e6
        print(
            f"| {name} | {calls} | {calls / ours_seconds:,.0f} | {calls / echo_seconds:,.0f} | {overhead_us:+,.0f} µs |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=9000)
    uvloop.run(main(parser.parse_args().requests))
