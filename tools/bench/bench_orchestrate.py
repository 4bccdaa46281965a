"""The orchestrator's cost per step, side by side with a bare asyncio runner and LangGraph.

1. In process, no-op steps: a 100-step chain and a 10x10 layered DAG (each step of a layer depends
   on every step of the layer before), through the run manager (in-memory store, events recorded),
   a bare asyncio ready-set runner, and LangGraph (installed with `pip install -e .[bench]`).
2. Durable runs through gRPC: Orchestrate (SQLite) and Execute as separate processes; a client
   streams every event of 100-step `core.echo` chains, one at a time and 8 at once, of async and of
   sync durability; and the time from StartRun to a watcher seeing a run's first step.
3. Many live runs: 10,000 runs held at once by one run manager over SQLite, each waiting in its
   step; the memory per live run is the growth of RSS divided by the runs.

Usage: ``python -m tools.bench.bench_orchestrate [--repeat N] [--live-runs N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import operator
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypedDict

import uvloop

from tierstack.client import ExecutorClient, OrchestratorClient
from tierstack.core.values import to_struct, to_value
from tierstack.server.orchestrate import MemoryRunStore, RunManager, RunStore, SqliteRunStore
from tierstack.v1 import common_pb2, executor_service_pb2
from tierstack.v1 import orchestrator_service_pb2 as pb
from tools.bench.processes import serving
from tools.bench.results import Results
from tools.bench.timing import interleaved, timed

Graph = dict[str, tuple[str, ...]]


def chain(length: int) -> Graph:
    return {f"s{i}": (f"s{i - 1}",) if i else () for i in range(length)}


def layered(layers: int, width: int) -> Graph:
    return {
        f"l{layer}_{i}": tuple(f"l{layer - 1}_{j}" for j in range(width)) if layer else ()
        for layer in range(layers)
        for i in range(width)
    }


def workflow(graph: Graph, tool: str = "core.echo") -> pb.Workflow:
    return pb.Workflow(
        name="bench",
        steps=[pb.WorkflowStep(id=sid, tool=tool, depends_on=deps) for sid, deps in graph.items()],
    )


class NoOpSteps:
    """A step runner whose steps finish at once: what is measured is the orchestration."""

    def __init__(self, *, hold_until: int = 0) -> None:
        self.gate = asyncio.Event()
        self.all_waiting = asyncio.Event()
        self._hold_until = hold_until
        self._waiting = 0
        if not hold_until:
            self.gate.set()

    async def cancel_execution(self, execution_id: str) -> bool:
        return False  # its steps end at once: nothing is ever in flight to stop

    async def execute(
        self, request: executor_service_pb2.ExecuteRequest
    ) -> AsyncIterator[executor_service_pb2.ExecutionEvent]:
        if not self.gate.is_set():
            self._waiting += 1
            if self._waiting == self._hold_until:
                self.all_waiting.set()
            await self.gate.wait()
        output = executor_service_pb2.ExecutionOutput(value=to_value(None))
        yield executor_service_pb2.ExecutionEvent(sequence=1, output=output)  # numbered, as Execute's are
        yield executor_service_pb2.ExecutionEvent(sequence=2, completed=executor_service_pb2.ExecutionCompleted())


async def run_tierstack(manager: RunManager, wf: pb.Workflow) -> None:
    run, _ = await manager.start_run(
        workflow=wf, inputs=to_struct({}), limits=common_pb2.ResourceLimits(), context=common_pb2.RequestContext()
    )
    async for _ in manager.watch(run.run_id):
        pass


async def run_bare(graph: Graph) -> None:
    """The least an asyncio program can do: start each step once its dependencies are done."""

    async def step() -> None:
        await asyncio.sleep(0)

    waiting = {sid: len(deps) for sid, deps in graph.items()}
    dependents: dict[str, list[str]] = {sid: [] for sid in graph}
    for sid, deps in graph.items():
        for dep in deps:
            dependents[dep].append(sid)
    running = {asyncio.create_task(step()): sid for sid, count in waiting.items() if count == 0}
    while running:
        done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            for dependent in dependents[running.pop(task)]:
                waiting[dependent] -= 1
                if waiting[dependent] == 0:
                    running[asyncio.create_task(step())] = dependent


def langgraph_runner(graph: Graph) -> Callable[[], Awaitable[Any]] | None:
    try:
        from langgraph.graph import END, START, StateGraph
    except ImportError:
        return None

    class State(TypedDict):
        done: Annotated[int, operator.add]

    async def node(state: State) -> dict[str, int]:
        return {"done": 1}

    builder = StateGraph(State)
    for sid in graph:
        builder.add_node(sid, node)
    for sid, deps in graph.items():
        if not deps:
            builder.add_edge(START, sid)
        elif len(deps) == 1:
            builder.add_edge(deps[0], sid)
        else:
            builder.add_edge(list(deps), sid)
    leaves = set(graph) - {dep for deps in graph.values() for dep in deps}
    for leaf in leaves:
        builder.add_edge(leaf, END)
    compiled = builder.compile()
    return lambda: compiled.ainvoke({"done": 0})


async def in_process(repeat: int, results: Results) -> None:
    manager = RunManager(MemoryRunStore(), NoOpSteps())
    await manager.open()
    rows: list[tuple[object, ...]] = []
    notes = []
    try:
        for name, graph in (("100-step chain", chain(100)), ("10x10 layered DAG", layered(10, 10))):
            wf = workflow(graph)

            async def bare(graph: Graph = graph) -> None:
                await run_bare(graph)

            async def ours(wf: pb.Workflow = wf) -> None:
                await run_tierstack(manager, wf)

            runners: dict[str, Callable[[], Awaitable[Any]]] = {"bare asyncio": bare, "tierstack": ours}
            langgraph = langgraph_runner(graph)
            if langgraph is not None:
                runners["LangGraph"] = langgraph
            samples = await interleaved(runners, repeat)
            base = samples["bare asyncio"]
            for runner, seconds in samples.items():
                per_step = statistics.median(seconds) / len(graph) * 1e6
                ratio = statistics.median(s / b for s, b in zip(seconds, base, strict=True))
                rows.append((name, len(graph), runner, f"{per_step:,.1f}", f"{ratio:.1f}x"))
            if langgraph is None:
                rows.append((name, len(graph), "LangGraph", "not installed (`pip install -e .[bench]`)", ""))
            else:
                faster = statistics.median(
                    g / t for g, t in zip(samples["LangGraph"], samples["tierstack"], strict=True)
                )
                notes.append(f"{name}: tierstack takes 1/{faster:.1f} of LangGraph's time per step.")
                results.compare(
                    f"Orchestrate {name}: µs per step (vs LangGraph)",
                    statistics.median(samples["tierstack"]) / len(graph) * 1e6,
                    statistics.median(samples["LangGraph"]) / len(graph) * 1e6,
                    "µs",
                )
    finally:
        await manager.close()
    results.table(
        "Orchestrate in process: per-step cost of no-op steps (medians over interleaved rounds)",
        ("graph", "steps", "runner", "µs per step", "vs bare asyncio"),
        rows,
        " ".join(notes) + " Ratios are medians of per-round ratios.",
    )


async def durable_over_grpc(repeat: int, results: Results) -> None:
    with tempfile.TemporaryDirectory() as data:
        async with (
            serving(sys.executable, "-m", "tierstack.cli", "serve", "execute", "--port", "0") as (execute_target, _),
            serving(
                sys.executable,
                "-m",
                "tierstack.cli",
                "serve",
                "orchestrate",
                "--port",
                "0",
                "--execute-target",
                execute_target,
                "--data-dir",
                data,
            ) as (orchestrate_target, _),
            OrchestratorClient(orchestrate_target) as client,
            ExecutorClient(execute_target) as executor,
        ):
            wf = workflow(chain(100))
            hop = executor_service_pb2.ExecuteRequest(
                step_id="s", tool_calls=[common_pb2.ToolCall(tool="core.echo", arguments=to_struct({}))]
            )

            async def one_hop() -> None:
                async for _ in executor.execute(hop):
                    pass

            hop_seconds = await timed(one_hop, 200)

            async def one_run(durability: pb.RunDurability.ValueType) -> int:
                events = 0
                async for _ in client.orchestrate(pb.OrchestrateRequest(workflow=wf, durability=durability)):
                    events += 1
                return events

            await one_run(pb.RUN_DURABILITY_ASYNC)
            rows = []
            for durability in (pb.RUN_DURABILITY_ASYNC, pb.RUN_DURABILITY_SYNC):
                mode = pb.RunDurability.Name(durability).removeprefix("RUN_DURABILITY_").lower()
                for concurrency in (1, 8):
                    samples = []
                    events = 0
                    for _ in range(repeat):
                        start = time.perf_counter()
                        counts = await asyncio.gather(*(one_run(durability) for _ in range(concurrency)))
                        samples.append(time.perf_counter() - start)
                        events = counts[0]
                    seconds = statistics.median(samples)
                    per_step = seconds / 100 / concurrency
                    rows.append(
                        (
                            mode,
                            concurrency,
                            f"{concurrency / seconds:,.1f}",
                            f"{per_step * 1e3:.3f}",
                            f"{per_step / hop_seconds:.2f}x",
                            events,
                        )
                    )
                    if concurrency == 1 and durability == pb.RUN_DURABILITY_ASYNC:
                        results.samples("orchestrate: one step of a durable run", [s / 100 for s in samples])
                    results.compare(
                        f"Orchestrate durable step ({mode}), {concurrency} runs at once (vs the bare hop)",
                        per_step * 1e3,
                        hop_seconds * 1e3,
                        "ms",
                    )
            results.table(
                "Orchestrate durable runs through gRPC: 100-step chains of `core.echo`, SQLite, every event streamed",
                ("durability", "concurrent runs", "runs/s", "ms per step", "vs the bare hop", "events per run"),
                rows,
                f"The floor: one bare Execute stream call (one step's hop to Tier 3) takes {hop_seconds * 1e3:.3f} ms. "
                "Sync: a step's completion is stored before the next step starts.",
            )
            await first_step_seen(client, hop_seconds, repeat * 40, results)


async def first_step_seen(client: OrchestratorClient, hop_seconds: float, rounds: int, results: Results) -> None:
    """How long after StartRun returns a watcher sees the run's first step start and complete."""
    wf = workflow(chain(1))
    started, completed = [], []
    for _ in range(rounds):
        begin = time.perf_counter()
        run = (await client.start_run(pb.StartRunRequest(workflow=wf))).run
        async for event in client.watch_run(run.run_id):
            if event.HasField("step_started"):
                started.append(time.perf_counter() - begin)
            elif event.HasField("step_completed"):
                completed.append(time.perf_counter() - begin)
                break
    rows = []
    for name, samples in (("the first step started", started), ("the first step completed", completed)):
        cuts = statistics.quantiles(samples, n=20)
        rows.append((name, f"{statistics.median(samples) * 1e3:.2f}", f"{cuts[-1] * 1e3:.2f}"))
    results.compare(
        "StartRun to a watcher seeing the first step start (vs the bare hop)",
        statistics.median(started) * 1e3,
        hop_seconds * 1e3,
        "ms",
    )
    results.table(
        f"From StartRun to a watcher: a one-step run of `core.echo`, {rounds} runs one after another",
        ("a watcher sees", "median ms", "p95 ms"),
        rows,
        "Timed from the StartRun call; each event reaches watchers once it is stored (goal: first step under 3 ms).",
    )


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def many_live_runs(count: int, results: Results) -> None:
    with tempfile.TemporaryDirectory() as data:
        store: RunStore = SqliteRunStore(Path(data) / "runs.sqlite3")
        await store.open()
        steps = NoOpSteps(hold_until=count)
        manager = RunManager(store, steps)
        await manager.open()
        try:
            wf = workflow(chain(2))
            before = rss_bytes()
            start = time.perf_counter()
            for _ in range(count):
                await manager.start_run(
                    workflow=wf,
                    inputs=to_struct({}),
                    limits=common_pb2.ResourceLimits(),
                    context=common_pb2.RequestContext(),
                )
            started = time.perf_counter() - start
            await steps.all_waiting.wait()
            held = rss_bytes() - before
            steps.gate.set()
            start = time.perf_counter()
            while manager.live_runs:  # noqa: ASYNC110 - the manager has no "all runs ended" event to wait on
                await asyncio.sleep(0.01)
            finished = time.perf_counter() - start
        finally:
            await manager.close()
            await store.close()
    results.table(
        "Orchestrate: live runs held by one process (SQLite store)",
        ("live runs", "started in", "RSS growth", "per live run", "all finished in"),
        [
            (
                f"{count:,}",
                f"{started:.1f} s",
                f"{held / 2**20:,.1f} MiB",
                f"{held / count / 1024:,.1f} KiB",
                f"{finished:.1f} s",
            )
        ],
    )


async def main(repeat: int, live_runs: int, results: Results) -> None:
    await in_process(repeat, results)
    await durable_over_grpc(repeat, results)
    await many_live_runs(live_runs, results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--live-runs", type=int, default=10_000)
    parser.add_argument("--json", type=Path, help="also write the findings here, for the report")
    arguments = parser.parse_args()
    found = Results()
    uvloop.run(main(arguments.repeat, arguments.live_runs, found))
    found.save(arguments.json)
