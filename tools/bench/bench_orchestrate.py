"""The orchestrator's cost per step, side by side with a bare asyncio runner and LangGraph.

1. In process, no-op steps: a 100-step chain and a 10x10 layered DAG (each step of a layer depends
   on every step of the layer before), through the run manager (in-memory store, events recorded),
   a bare asyncio ready-set runner, and LangGraph (installed with `pip install -e .[bench]`).
2. Durable runs side by side: tierstack through its servers (Orchestrate on SQLite, Execute, each a
   process of its own; a client streams every event) and LangGraph in process with its SQLite
   checkpointer, each in sync and async durability: a 100-step chain and a 10x10 layered DAG one run
   at a time, 10-step chains 8 and 64 at once; and the time from StartRun to a watcher seeing a run's
   first step.
3. Memory per live run: ``--live-runs`` runs held at once, each waiting in its first step, by the run
   manager in process, by the servers through gRPC, and by LangGraph with its SQLite checkpointer.

Usage: ``python -m tools.bench.bench_orchestrate [--repeat N] [--live-runs N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import operator
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypedDict

import uvloop

from tierstack.client import ExecutorClient, OrchestratorClient
from tierstack.core.values import to_struct, to_value
from tierstack.server.orchestrate import MemoryRunStore, RunManager, RunStore, SqliteRunStore
from tierstack.v1 import common_pb2, executor_service_pb2
from tierstack.v1 import orchestrator_service_pb2 as pb
from tools.bench.processes import tiers_2_and_3
from tools.bench.results import Results
from tools.bench.timing import interleaved, timed
from tools.live_runs import live_runs

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


def langgraph_graph(graph: Graph, node: Callable[..., Awaitable[dict[str, int]]] | None = None) -> Any:
    """Returns a LangGraph ``StateGraph`` of ``graph`` whose nodes are ``node`` (by default one that
    does nothing); raises ImportError without LangGraph."""
    from langgraph.graph import END, START, StateGraph

    class State(TypedDict):
        done: Annotated[int, operator.add]

    async def nothing(state: State) -> dict[str, int]:
        return {"done": 1}

    builder = StateGraph(State)
    for sid in graph:
        builder.add_node(sid, node or nothing)
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
    return builder


def langgraph_runner(graph: Graph) -> Callable[[], Awaitable[Any]] | None:
    """Returns a runner of ``graph`` in LangGraph without a checkpointer; None without LangGraph."""
    try:
        compiled = langgraph_graph(graph).compile()
    except ImportError:
        return None
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


#: The durable workloads side by side: (name, graph, runs at once).
DURABLE = (
    ("100-step chain, one run", chain(100), 1),
    ("10x10 layered DAG, one run", layered(10, 10), 1),
    ("10-step chain, 8 runs at once", chain(10), 8),
    ("10-step chain, 64 runs at once", chain(10), 64),
)
Runner = Callable[[Graph], Awaitable[None]]


async def durable_side_by_side(repeat: int, results: Results) -> None:
    """Durable runs of no-op steps: tierstack through its servers (Orchestrate on SQLite, each step a
    `core.echo` in Execute) against LangGraph in process with its SQLite checkpointer, each in both
    durabilities, interleaved round by round."""
    with tempfile.TemporaryDirectory() as data:
        async with (
            tiers_2_and_3(Path(data)) as tiers,
            OrchestratorClient(tiers.orchestrate_target) as client,
            ExecutorClient(tiers.execute_target) as executor,
            langgraph_durable(Path(data) / "langgraph.sqlite3") as langgraph,
        ):
            hop = executor_service_pb2.ExecuteRequest(
                step_id="s", tool_calls=[common_pb2.ToolCall(tool="core.echo", arguments=to_struct({}))]
            )

            async def one_hop() -> None:
                async for _ in executor.execute(hop):
                    pass

            hop_seconds = await timed(one_hop, 200)
            engines: dict[str, Runner] = {}
            for durability in (pb.RUN_DURABILITY_ASYNC, pb.RUN_DURABILITY_SYNC):
                mode = pb.RunDurability.Name(durability).removeprefix("RUN_DURABILITY_").lower()
                engines[f"tierstack, {mode}"] = functools.partial(_tierstack_run, client, durability)
            for mode, run in (langgraph or {}).items():
                engines[f"LangGraph + SqliteSaver, {mode}"] = run
            rows = []
            for name, graph, concurrency in DURABLE:
                runners: dict[str, Callable[[], Awaitable[Any]]] = {
                    engine: functools.partial(_at_once, run, graph, concurrency) for engine, run in engines.items()
                }
                samples = await interleaved(runners, repeat)
                for engine, seconds in samples.items():
                    median = statistics.median(seconds)
                    per_step = median / len(graph) / concurrency
                    rows.append(
                        (name, engine, f"{per_step * 1e3:.3f}", f"{concurrency / median:,.1f}", _vs(samples, engine))
                    )
                    if engine == "tierstack, async" and concurrency == 1 and len(graph) == 100:
                        results.samples("orchestrate: one step of a durable run", [s / 100 for s in seconds])
                if "LangGraph + SqliteSaver, async" in samples:
                    results.compare(
                        f"Orchestrate durable {name}, async: ms per step (vs LangGraph + SqliteSaver)",
                        statistics.median(samples["tierstack, async"]) / len(graph) / concurrency * 1e3,
                        statistics.median(samples["LangGraph + SqliteSaver, async"]) / len(graph) / concurrency * 1e3,
                        "ms",
                    )
            missing = "" if langgraph else " LangGraph is not installed (`pip install -e .[bench]`)."
            results.table(
                "Durable runs side by side: tierstack through its servers (SQLite) and LangGraph in process "
                "(SQLite checkpointer), no-op steps",
                ("workload", "engine", "ms per step", "runs/s", "speed vs LangGraph, same durability"),
                rows,
                "Medians of interleaved rounds. tierstack: each step a `core.echo` call in Execute (a process of its "
                f"own; the bare hop takes {hop_seconds * 1e3:.3f} ms), every event streamed to the caller; sync "
                "stores a step's completion before its dependents start, async with the next commit. LangGraph: "
                "a node that does nothing, in the benchmark's own process, checkpointed by AsyncSqliteSaver (its "
                "durability `sync` or `async`)." + missing,
            )
            await first_step_seen(client, hop_seconds, repeat * 40, results)


def _vs(samples: dict[str, list[float]], engine: str) -> str:
    """Returns an engine's speed against LangGraph's in the same durability: LangGraph's time over its
    own, the median of the rounds (above 1: faster than LangGraph)."""
    mode = engine.rpartition(", ")[2]
    peer = samples.get(f"LangGraph + SqliteSaver, {mode}")
    if peer is None or engine.startswith("LangGraph"):
        return ""
    return f"{statistics.median(p / s for p, s in zip(peer, samples[engine], strict=True)):.2f}x"


async def _at_once(run: Runner, graph: Graph, concurrency: int) -> None:
    await asyncio.gather(*(run(graph) for _ in range(concurrency)))


async def _tierstack_run(client: OrchestratorClient, durability: pb.RunDurability.ValueType, graph: Graph) -> None:
    async for _ in client.orchestrate(pb.OrchestrateRequest(workflow=workflow(graph), durability=durability)):
        pass


@contextlib.asynccontextmanager
async def langgraph_durable(path: Path) -> AsyncIterator[dict[str, Runner] | None]:
    """Yields LangGraph runners of a graph, checkpointed in SQLite at ``path``, by durability; None
    when LangGraph or its SQLite checkpointer is not installed."""
    try:
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
    except ImportError:
        yield None
        return
    async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
        compiled: dict[int, Any] = {}

        def runner(durability: str) -> Runner:
            async def run(graph: Graph) -> None:
                key = id(graph)
                if key not in compiled:
                    compiled[key] = langgraph_graph(graph).compile(checkpointer=saver)
                config = {"configurable": {"thread_id": uuid.uuid4().hex}}
                await compiled[key].ainvoke({"done": 0}, config, durability=durability)

            return run

        yield {"async": runner("async"), "sync": runner("sync")}


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
    """Memory per live run: ``count`` runs of two steps held at once, each waiting in its first step,
    by tierstack's run manager in process, by tierstack's servers (through gRPC, see
    :mod:`tools.live_runs`) and by LangGraph in process with its SQLite checkpointer."""
    rows = [await _in_process_live_runs(count)]
    with tempfile.TemporaryDirectory() as data:
        report = await live_runs(count, Path(data))
    per_run = report.rss_per_live_run_kib
    rows.append(
        (
            "tierstack through gRPC (Orchestrate on SQLite, and Execute)",
            f"{report.most_live:,}",
            f"{sum(per_run.values()):,.1f} KiB ({per_run['orchestrate']:,.1f} + {per_run['execute']:,.1f})",
            f"{report.failures:,}",
        )
    )
    langgraph = await _langgraph_live_runs(count)
    if langgraph is not None:
        rows.append(langgraph)
    results.table(
        "Memory per live run: runs held at once, each waiting in the first of its two steps",
        ("engine", "live runs", "RSS per live run", "runs not completed"),
        rows,
        "RSS growth of the processes that hold the runs, divided by the runs; every run then completes.",
    )


async def _in_process_live_runs(count: int) -> tuple[str, str, str, str]:
    with tempfile.TemporaryDirectory() as data:
        store: RunStore = SqliteRunStore(Path(data) / "runs.sqlite3")
        await store.open()
        steps = NoOpSteps(hold_until=count)
        manager = RunManager(store, steps)
        await manager.open()
        try:
            wf = workflow(chain(2))
            before = rss_bytes()
            for _ in range(count):
                await manager.start_run(
                    workflow=wf,
                    inputs=to_struct({}),
                    limits=common_pb2.ResourceLimits(),
                    context=common_pb2.RequestContext(),
                )
            await steps.all_waiting.wait()
            held = rss_bytes() - before
            steps.gate.set()
            while manager.live_runs:  # noqa: ASYNC110 - the manager has no "all runs ended" event to wait on
                await asyncio.sleep(0.01)
            failed = sum(n for state, n in manager.runs_by_state().items() if state != "RUN_STATE_COMPLETED")
        finally:
            await manager.close()
            await store.close()
    return (
        "tierstack's run manager in process (SQLite)",
        f"{count:,}",
        f"{held / count / 1024:,.1f} KiB",
        f"{failed:,}",
    )


async def _langgraph_live_runs(count: int) -> tuple[str, str, str, str] | None:
    gate, waiting, all_waiting = asyncio.Event(), 0, asyncio.Event()

    async def wait(state: Any) -> dict[str, int]:
        nonlocal waiting
        waiting += 1
        if waiting == count:
            all_waiting.set()
        await gate.wait()
        return {"done": 1}

    try:
        builder = langgraph_graph(chain(2), node=wait)
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as data:
        async with AsyncSqliteSaver.from_conn_string(str(Path(data) / "langgraph.sqlite3")) as saver:
            compiled = builder.compile(checkpointer=saver)
            before = rss_bytes()
            runs = [
                asyncio.create_task(
                    compiled.ainvoke({"done": 0}, {"configurable": {"thread_id": str(n)}}, durability="async")
                )
                for n in range(count)
            ]
            await all_waiting.wait()
            held = rss_bytes() - before
            gate.set()
            ended = await asyncio.gather(*runs, return_exceptions=True)
    failed = sum(isinstance(outcome, BaseException) for outcome in ended)
    return (
        "LangGraph + SqliteSaver in process (async)",
        f"{count:,}",
        f"{held / count / 1024:,.1f} KiB",
        f"{failed:,}",
    )


async def main(repeat: int, live: int, results: Results) -> None:
    await in_process(repeat, results)
    await durable_side_by_side(repeat, results)
    await many_live_runs(live, results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--live-runs", type=int, default=10_000)
    parser.add_argument("--json", type=Path, help="also write the findings here, for the report")
    arguments = parser.parse_args()
    found = Results()
    uvloop.run(main(arguments.repeat, arguments.live_runs, found))
    found.save(arguments.json)
