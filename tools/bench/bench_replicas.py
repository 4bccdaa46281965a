"""Durable runs on PostgreSQL against SQLite, one Orchestrate replica against two, and failover.

Every tier is a process of its own; PostgreSQL is a server of the benchmark's own that waits for
the disk on every commit (``fsync`` on), as SQLite's WAL does at its checkpoints.

1. A durable step: 50-step chains of ``core.echo``, one run at a time (ms per step, p50 and p90 of
   the runs), and 64 ten-step runs at once (runs/s), on SQLite and on PostgreSQL, interleaved.
2. Replicas: the 64 ten-step runs at once through one and through two Orchestrate replicas on one
   PostgreSQL database, the client balancing over them.
3. Failover: a run of short sleeps driven by one replica; it is SIGKILLed and the time until the
   survivor records the run's next step is measured (the lease is 2 s).

Usage: ``python -m tools.bench.bench_replicas [--repeat N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import uvloop

from tierstack.client import OrchestratorClient
from tierstack.core.values import to_struct
from tierstack.v1 import orchestrator_service_pb2 as pb
from tools.bench.bench_orchestrate import chain, workflow
from tools.bench.processes import serving
from tools.bench.results import Results
from tools.postgres import LocalPostgres

LEASE_SECONDS = 2.0


def tier(name: str, *arguments: str, env: dict[str, str]) -> Any:
    """Runs ``tierstack serve <name>`` for the block; yields its address and its process."""
    serve = (sys.executable, "-m", "tierstack.cli", "serve", name, "--port", "0", "--metrics-port", "0")
    return serving(*serve, *arguments, env=env)


@contextlib.asynccontextmanager
async def stack(
    store_url: str, data: Path, replicas: int = 1
) -> AsyncIterator[tuple[str, list[asyncio.subprocess.Process]]]:
    """One Execute and ``replicas`` Orchestrate servers on the store; yields the Orchestrate target
    (all replicas) and their processes."""
    env = {"TIERSTACK_STORE_URL": store_url, "TIERSTACK_LEASE_SECONDS": str(LEASE_SECONDS)}
    async with contextlib.AsyncExitStack() as servers:
        execute, _ = await servers.enter_async_context(tier("execute", "--data-dir", str(data), env=env))
        orchestrators = [
            await servers.enter_async_context(
                tier("orchestrate", "--execute-target", execute, "--data-dir", str(data / f"o{k}"), env=env)
            )
            for k in range(replicas)
        ]
        yield ",".join(target for target, _ in orchestrators), [process for _, process in orchestrators]


async def run_once(client: OrchestratorClient, wf: pb.Workflow) -> None:
    started = await client.start_run(pb.StartRunRequest(workflow=wf))
    async for _ in client.watch_run(started.run.run_id):
        pass


async def runs_per_second(client: OrchestratorClient, wf: pb.Workflow, runs: int) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(run_once(client, wf) for _ in range(runs)))
    return runs / (time.perf_counter() - start)


async def database_load(url: str, client: OrchestratorClient, wf: pb.Workflow) -> dict[str, float]:
    """Measures what 64 runs at once cost the database: commits per second, and events and commits
    per step (from PostgreSQL's own counters)."""
    connection = await asyncpg.connect(url)
    try:
        query = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        commits, events = await connection.fetchval(query), await connection.fetchval("SELECT count(*) FROM run_events")
        start = time.perf_counter()
        await runs_per_second(client, wf, 64)
        seconds = time.perf_counter() - start
        await asyncio.sleep(0.6)  # the statistics collector reports within half a second
        commits = await connection.fetchval(query) - commits
        events = await connection.fetchval("SELECT count(*) FROM run_events") - events
    finally:
        await connection.close()
    steps = 64 * len(wf.steps)
    return {
        "commits_per_second": commits / seconds,
        "events_per_step": events / steps,
        "commits_per_step": commits / steps,
    }


def percentile(samples: Sequence[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def stores(repeat: int, postgres: LocalPostgres, results: Results) -> None:
    long, short = workflow(chain(50)), workflow(chain(10))
    per_step: dict[str, list[float]] = {"SQLite": [], "PostgreSQL": []}
    rates: dict[str, list[float]] = {"SQLite": [], "PostgreSQL": []}
    with tempfile.TemporaryDirectory() as folder:
        urls = {"SQLite": f"sqlite:///{folder}/sqlite", "PostgreSQL": postgres.new_database()}
        async with contextlib.AsyncExitStack() as opened:
            clients = {}
            for name, url in urls.items():
                target, _ = await opened.enter_async_context(stack(url, Path(folder) / name))
                clients[name] = await opened.enter_async_context(OrchestratorClient(target))
            for client in clients.values():  # warm up
                await run_once(client, long)
            for _ in range(repeat):  # interleaved, so drift in the machine hits both alike
                for name, client in clients.items():
                    start = time.perf_counter()
                    await run_once(client, long)
                    per_step[name].append((time.perf_counter() - start) / 50)
                    rates[name].append(await runs_per_second(client, short, 64))
            load = await database_load(urls["PostgreSQL"], clients["PostgreSQL"], short)
    rows = [
        (
            name,
            f"{statistics.median(per_step[name]) * 1e3:.2f}",
            f"{percentile(per_step[name], 0.9) * 1e3:.2f}",
            f"{statistics.median(rates[name]):.1f}",
        )
        for name in per_step
    ]
    pg, lite = statistics.median(per_step["PostgreSQL"]), statistics.median(per_step["SQLite"])
    results.compare("durable step on PostgreSQL (vs SQLite)", pg * 1e3, lite * 1e3, "ms")
    results.table(
        "A durable step on each store: 50-step chains one at a time, and 64 ten-step runs at once",
        ("store", "ms per step, p50", "p90", "ten-step runs/s, 64 at once"),
        rows,
        f"PostgreSQL costs {pg / lite:.2f}x SQLite per step; medians of {repeat} interleaved rounds. While"
        f" 64 runs ran at once, PostgreSQL committed {load['commits_per_second']:.0f} transactions/s and stored"
        f" {load['events_per_step']:.1f} events and {load['commits_per_step']:.2f} commits per step.",
    )


async def replicas(repeat: int, postgres: LocalPostgres, results: Results) -> None:
    short = workflow(chain(10))
    rates: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as folder:
        async with contextlib.AsyncExitStack() as opened:
            clients = {}
            for count in rates:
                target, _ = await opened.enter_async_context(
                    stack(postgres.new_database(), Path(folder) / str(count), count)
                )
                clients[count] = await opened.enter_async_context(OrchestratorClient(target))
                await runs_per_second(clients[count], short, 16)  # warm up, every replica connected
            for _ in range(repeat):
                for count, client in clients.items():
                    rates[count].append(await runs_per_second(client, short, 64))
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    results.compare("ten-step runs/s, two Orchestrate replicas (vs one)", two, one, "runs/s", lower_is_better=False)
    results.table(
        "Orchestrate replicas on one PostgreSQL: 64 ten-step runs at once, the client balancing round-robin",
        ("replicas", "runs/s, p50", "min", "max"),
        [(count, f"{statistics.median(r):.1f}", f"{min(r):.1f}", f"{max(r):.1f}") for count, r in rates.items()],
        f"Two replicas: {two / one:.2f}x one, on {os.cpu_count()} cores shared by every process of the run.",
    )


async def failover(repeat: int, postgres: LocalPostgres, results: Results) -> None:
    steps = [
        pb.WorkflowStep(
            id=f"s{n}",
            tool="core.sleep",
            parameters=to_struct({"seconds": 0.05}),
            depends_on=[f"s{n - 1}"] if n else [],
        )
        for n in range(400)
    ]
    wf = pb.Workflow(name="failover", steps=steps)
    gaps = []
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(repeat):
            async with stack(postgres.new_database(), Path(folder) / str(round_), 2) as (target, processes):
                first, second = target.split(",")
                async with OrchestratorClient(first) as driver, OrchestratorClient(second) as survivor:
                    run_id = (await driver.start_run(pb.StartRunRequest(workflow=wf))).run.run_id
                    watched = survivor.watch_run(run_id)
                    async for event in watched:
                        if event.HasField("step_completed") and event.step_completed.step_id == "s5":
                            break
                    processes[0].kill()
                    killed = time.perf_counter()
                    resumed = False
                    async for event in watched:  # the first step the survivor starts, once it took the run
                        resumed = resumed or event.HasField("run_resumed")
                        if resumed and event.HasField("step_started"):
                            gaps.append(time.perf_counter() - killed)
                            break
                    await survivor.cancel_run(run_id)
    results.samples("failover: SIGKILL to the survivor's next step", gaps)
    results.table(
        f"Failover: SIGKILL of the replica driving a run to the next step on the survivor (lease {LEASE_SECONDS:g} s)",
        ("rounds", "p50 s", "max s"),
        [(len(gaps), f"{statistics.median(gaps):.2f}", f"{max(gaps):.2f}")],
        "The survivor takes a run over once its lease has passed, at its next renewal (a third of a lease).",
    )


async def main(repeat: int, results: Results) -> None:
    with LocalPostgres(durable=True) as postgres:
        await stores(repeat, postgres, results)
        await replicas(repeat, postgres, results)
        await failover(max(3, repeat // 2), postgres, results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    found = Results()
    uvloop.run(main(arguments.repeat, found))
    found.save(arguments.json)
