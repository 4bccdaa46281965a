"""Sends hostile requests (tests/hostile.py) to the three tiers running as processes and reports what
they answered, how much memory they took, and whether they still serve.

The tiers run as separate ``tierstack serve`` processes rather than in the test's own process: a tier
that spins on its event loop or grows without bound must not freeze or exhaust the process that judges
it, a crash shows as the process exiting, and each tier's memory is read from ``/proc``. Requests are
drawn by hypothesis in a worker process, chunk by chunk, while the chunk before is being sent, so that
drawing and sending overlap instead of sharing one interpreter.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import re
import signal
from collections import Counter, defaultdict
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
from google.protobuf import message_factory, text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers import HttpServer, Process, reply, spawned_stack
from tests.hostile import METHODS, Case, Known, Shapes, generate
from tierstack.client import CoordinatorClient, ExecutorClient, OrchestratorClient
from tierstack.core.errors import Code
from tierstack.core.values import JSON, from_struct, from_value, to_struct
from tierstack.v1 import common_pb2, coordinator_service_pb2, executor_service_pb2, orchestrator_service_pb2

#: Answers no request may get: they mean the server failed in a way it did not handle.
FORBIDDEN = ("UNKNOWN", "INTERNAL", "DATA_LOSS")
#: How many messages of a stream are read before the call is cancelled. A stream that answered with at
#: least one message counts as OK when it is cancelled or its deadline ends it: the server answered,
#: and a watch may rightly go on for ever.
STREAM_MESSAGES = 3
#: How many requests one hypothesis run draws.
CHUNK = 250
#: Each tier's memory bound, its process and any worker processes it started together.
MEMORY_BOUND = 1 << 30

_BY_PATH = {method.path: method for method in METHODS}
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\w+) ")


@dataclass
class Failure:
    """One kind of forbidden answer: the first request that got it, how many did, and on which methods."""

    case: Case
    code: str
    details: str
    count: int = 1
    methods: set[str] = field(default_factory=set)

    def describe(self) -> str:
        """Returns the failure with a request that reproduces it."""
        return (
            f"{self.code} x{self.count} {self.details[:300]!r}\n"
            f"    on: {', '.join(sorted(self.methods))}\n"
            f"    first: {show(self.case)}"
        )


def show(case: Case) -> str:
    """Returns a request as its method, tier and fields, and the bytes that replay it."""
    method = _BY_PATH[case.method]
    try:
        decoded = message_factory.GetMessageClass(method.input).FromString(case.payload)
        shown = text_format.MessageToString(decoded, as_one_line=True)
    except Exception as error:  # the bytes are malformed on purpose; say how
        shown = f"<does not decode: {error}>"
    payload = case.payload
    data = payload.hex() if len(payload) <= 2048 else f"{payload[:512].hex()}… ({len(payload)} bytes)"
    return (
        f"{method.name} on {case.tier} ({case.kind}): {shown[:600]}\n"
        f"    replay: await replay(target, {method.path!r}, bytes.fromhex({data!r}))"
    )


@dataclass
class Tally:
    """The answers to one fuzz run, by status code and by method, and the forbidden ones by kind."""

    seed: int
    calls: int = 0
    by_code: Counter[str] = field(default_factory=Counter)
    by_method: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    failures: dict[tuple[str, str], Failure] = field(default_factory=dict)
    seconds: float = 0.0
    timed_out: bool = False
    stopped: str = ""
    #: The requests still in flight when the run was ended early.
    unfinished: list[Case] = field(default_factory=list)

    def add(self, case: Case, code: str, details: str) -> None:
        self.calls += 1
        self.by_code[code] += 1
        self.by_method[_BY_PATH[case.method].name][code] += 1
        if code in FORBIDDEN:
            failure = self.failures.setdefault((code, _shape(details)), Failure(case, code, details, count=0))
            failure.count += 1
            failure.methods.add(_BY_PATH[case.method].name)

    def summary(self) -> str:
        codes = ", ".join(f"{code}={count}" for code, count in self.by_code.most_common())
        lines = [f"{self.calls} calls in {self.seconds:.0f} s (seed {self.seed}): {codes}"]
        width = max((len(name) for name in self.by_method), default=0)
        for name in sorted(self.by_method):
            by_code = self.by_method[name].most_common()
            lines.append(f"  {name:<{width}}  " + " ".join(f"{code}={count}" for code, count in by_code))
        if self.timed_out:
            lines.append("  the time limit ended the run")
        if self.stopped:
            lines.append(f"  stopped early: {self.stopped}")
        lines.extend(failure.describe() for failure in self.failures.values())
        return "\n".join(lines)


def _shape(text: str) -> str:
    """Returns an error text with what varies from call to call (quoted input, bracketed names, numbers)
    blanked, so that failures of one kind share one shape."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]", "'…'", text)
    return re.sub(r"\d+", "N", text)[:100]


async def replay(target: str, path: str, payload: bytes, *, timeout: float = 5.0) -> tuple[str, str]:
    """Sends the bytes of one request to ``path`` at ``target``; returns the status code and details."""
    async with grpc.aio.insecure_channel(target) as channel:
        return await _send(channel, path, payload, timeout)


async def _send(channel: grpc.aio.Channel, path: str, payload: bytes, timeout: float) -> tuple[str, str]:
    received = 0
    try:
        method = _BY_PATH[path]
        if method.bidirectional:  # one message on a stream of its own, then the stream's end
            answers = message_factory.GetMessageClass(method.output)
            both = cast("grpc.aio.StreamStreamMultiCallable[bytes, bytes]", channel.stream_stream(path))
            duplex = both(timeout=timeout)
            await duplex.write(payload)
            await duplex.done_writing()
            ended = []  # each call it carried ends with a status of its own
            async for answer in duplex:
                received += 1
                answered: Any = answers.FromString(answer)
                if answered.HasField("ended") and answered.ended.code:
                    ended.append((Code(answered.ended.code).name, answered.ended.message))
            if ended:
                return ended[0]
        elif method.streaming:
            stream = cast("grpc.aio.UnaryStreamMultiCallable[bytes, bytes]", channel.unary_stream(path))
            call = stream(payload, timeout=timeout)
            async for _ in call:
                received += 1
                if received == STREAM_MESSAGES:
                    call.cancel()
                    break
        else:
            unary = cast("grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]", channel.unary_unary(path))
            await unary(payload, timeout=timeout)
    except grpc.aio.AioRpcError as error:
        code = error.code()
        if not (received and code == grpc.StatusCode.DEADLINE_EXCEEDED):
            return code.name, error.details() or ""
    return "OK", ""


_shapes: Shapes | None = None


def _start_drawing(known: Known, skip: frozenset[str]) -> None:
    global _shapes
    _shapes = Shapes(known, skip=skip)


def _draw(count: int, seed: int) -> list[Case]:
    assert _shapes is not None
    return generate(_shapes.cases, count, seed)


class _Stopped(Exception):
    """Ends a fuzz run before its count or time limit."""


async def fuzz(
    targets: Mapping[str, str],
    known: Known,
    *,
    calls: int,
    seed: int,
    seconds: float,
    concurrency: int = 32,
    timeout: float = 2.0,
    stop: asyncio.Event | None = None,
    skip: frozenset[str] = frozenset(),
) -> Tally:
    """Sends ``calls`` hostile requests to the tiers at ``targets`` (by tier name), at most
    ``concurrency`` at once, each with a deadline of ``timeout`` seconds; ends early after ``seconds``
    or when ``stop`` is set; the methods ``skip`` names (``Service/Method``) get none. Chunk ``i`` of
    the requests is drawn with hypothesis seed ``seed * 100_000 + i``."""
    tally = Tally(seed)
    loop = asyncio.get_running_loop()
    began = loop.time()
    queue: asyncio.Queue[Case | None] = asyncio.Queue(maxsize=2 * CHUNK)
    channels = {tier: grpc.aio.insecure_channel(target) for tier, target in targets.items()}
    # spawn, not fork: the gRPC runtime of this process has threads a fork would not carry over.
    pool = ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn"), initializer=_start_drawing, initargs=(known, skip)
    )

    async def produce() -> None:
        drawn, index = 0, 0
        while drawn < calls:
            chunk = await loop.run_in_executor(pool, _draw, min(CHUNK, calls - drawn), seed * 100_000 + index)
            for case in chunk:
                await queue.put(case)
            drawn, index = drawn + len(chunk), index + 1
        for _ in range(concurrency):
            await queue.put(None)

    in_flight: dict[int, Case] = {}

    async def work() -> None:
        while (case := await queue.get()) is not None:
            in_flight[id(case)] = case
            tally.add(case, *await _send(channels[case.tier], case.method, case.payload, timeout))
            del in_flight[id(case)]

    async def watch(event: asyncio.Event) -> None:
        await event.wait()
        raise _Stopped

    try:
        async with asyncio.timeout(seconds):
            try:
                async with asyncio.TaskGroup() as group:
                    producer = group.create_task(produce())
                    workers = [group.create_task(work()) for _ in range(concurrency)]
                    watcher = group.create_task(watch(stop)) if stop is not None else None
                    await asyncio.gather(producer, *workers)
                    if watcher is not None:
                        watcher.cancel()
            except* _Stopped:
                tally.stopped = "a tier went past its memory bound"
    except TimeoutError:
        tally.timed_out = True
    finally:
        tally.seconds = loop.time() - began
        tally.unfinished = list(in_flight.values())
        for channel in channels.values():
            await channel.close()
        await loop.run_in_executor(None, lambda: pool.shutdown(cancel_futures=True))
    return tally


def process_tree(pid: int) -> list[int]:
    """Returns process ``pid`` and its descendants that are alive."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(child) for child in (task / "children").read_text().split())
            found.append(current)
    return found


def rss_bytes(pid: int) -> int:
    """Returns the resident memory of process ``pid`` and its descendants; 0 once it has exited."""
    total = 0
    for current in process_tree(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


class MemoryWatch:
    """Samples each tier's memory (:func:`rss_bytes`) until cancelled and keeps the peaks. A tier that
    goes past ``bound`` is killed at once, with its worker processes (so that it cannot take the
    machine's memory), and :attr:`over` is set."""

    def __init__(self, pids: Mapping[str, int], bound: int, *, interval: float = 0.25) -> None:
        self._pids = dict(pids)
        self.bound = bound
        self._interval = interval
        self.peaks: dict[str, int] = dict.fromkeys(pids, 0)
        self.killed: set[str] = set()
        self.over = asyncio.Event()

    async def run(self) -> None:
        while True:
            sizes = await asyncio.to_thread(lambda: {tier: rss_bytes(pid) for tier, pid in self._pids.items()})
            for tier, size in sizes.items():
                self.peaks[tier] = max(self.peaks[tier], size)
                if size > self.bound and tier not in self.killed:
                    for pid in process_tree(self._pids[tier]):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    self.killed.add(tier)
                    self.over.set()
            await asyncio.sleep(self._interval)


async def prepare(targets: Mapping[str, str], url: str) -> Known:
    """Returns what valid requests may name: Execute's tools, two runs Orchestrate holds (one
    finished, one that goes on for ten minutes, for pausing, resuming and cancelling) and a goal
    Coordinate holds."""
    tools: dict[str, dict[str, JSON]] = {}
    async with (
        ExecutorClient(targets["execute"]) as executor,
        OrchestratorClient(targets["orchestrate"]) as orchestrator,
        CoordinatorClient(targets["coordinate"]) as coordinator,
    ):
        token = ""
        while True:
            page = await executor.list_tools(executor_service_pb2.ListToolsRequest(page_size=1000, page_token=token))
            tools.update({tool.name: from_struct(tool.parameters_schema) for tool in page.tools})
            if not (token := page.next_page_token):
                break
        runs = []
        steps: tuple[tuple[str, dict[str, JSON]], ...] = (
            ("core.echo", {"value": "done"}),
            ("core.sleep", {"seconds": 600}),
        )
        for tool, arguments in steps:
            started = await orchestrator.start_run(
                orchestrator_service_pb2.StartRunRequest(workflow=_one_step(tool, arguments))
            )
            runs.append(started.run.run_id)
        agent = coordinator_service_pb2.Agent(id="writer", capabilities=["writing", "general"])
        goal = await coordinator.start_goal(
            coordinator_service_pb2.StartGoalRequest(goal="write a haiku", agents=[agent])
        )
    return Known(tools=tools, run_ids=tuple(runs), url=url, goal_ids=(goal.goal.goal_id,))


def _one_step(tool: str, arguments: dict[str, JSON]) -> orchestrator_service_pb2.Workflow:
    step = orchestrator_service_pb2.WorkflowStep(id="only", tool=tool, parameters=to_struct(arguments))
    return orchestrator_service_pb2.Workflow(name="known", steps=[step], outputs={"out": "{{steps.only.output}}"})


async def still_serving(tiers: Mapping[str, Process]) -> dict[str, str]:
    """Returns, by tier, what is wrong with it now: it exited, is not SERVING, or does not answer a
    known-good request correctly; empty when all is well."""
    problems: dict[str, str] = {}
    for tier, process in tiers.items():
        if process.process.returncode is not None:
            problems[tier] = f"exited with {process.process.returncode}: {''.join(process.lines[-5:])}"
            continue
        try:
            async with grpc.aio.insecure_channel(process.target) as channel:
                health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            if health.status != health_pb2.HealthCheckResponse.SERVING:
                problems[tier] = f"reports {health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)}"
        except grpc.aio.AioRpcError as error:
            problems[tier] = f"does not answer its health check: {error.code().name}"
    checks = {"execute": _echoes, "orchestrate": _runs_a_workflow, "coordinate": _forms_a_team}
    for tier, check in checks.items():
        if tier in problems:
            continue
        try:
            problem = await check(tiers[tier].target)
        except Exception as error:  # any failure of a known-good request is what this reports
            problem = f"failed: {error}"
        if problem:
            problems[tier] = f"the known-good request {problem}"
    return problems


async def _echoes(target: str) -> str:
    call = common_pb2.ToolCall(tool="core.echo", arguments=to_struct({"value": "still here"}))
    async with ExecutorClient(target, timeout=10) as executor:
        result = (await executor.execute_tool(executor_service_pb2.ExecuteToolRequest(call=call))).result
    output = from_value(result.output)
    return "" if output == "still here" else f"answered {output!r}"


async def _runs_a_workflow(target: str) -> str:
    request = orchestrator_service_pb2.OrchestrateRequest(workflow=_one_step("core.echo", {"value": "still here"}))
    async with OrchestratorClient(target) as orchestrator:
        events = [event async for event in orchestrator.orchestrate(request, timeout=30)]
    last = events[-1] if events else None
    if last is None or last.WhichOneof("payload") != "run_completed":
        return f"ended with {last}"
    output = from_value(last.run_completed.outputs["out"])
    return "" if output == "still here" else f"output {output!r}"


async def _forms_a_team(target: str) -> str:
    pb = coordinator_service_pb2
    request = pb.FormTeamRequest(
        agents=[pb.Agent(id="writer", capabilities=["writing"], max_concurrent_tasks=1)],
        subtasks=[pb.Subtask(id="draft", description="write", required_capabilities=["writing"], complexity=3)],
    )
    async with CoordinatorClient(target, timeout=10) as coordinator:
        formed = await coordinator.form_team(request)
    pairs = [(a.subtask_id, a.agent_id) for a in formed.assignments]
    return "" if pairs == [("draft", "writer")] else f"assigned {pairs}"


def logged_errors(lines: list[str]) -> Counter[str]:
    """Returns the ERROR and CRITICAL records in a tier's log, each with the last line of its traceback,
    counted by shape."""
    found: Counter[str] = Counter()
    record: str | None = None
    last = ""
    for line in [*lines, "0000-00-00 00:00:00,0 END "]:
        match = _LOG_LINE.match(line)
        if match is None:
            last = line.strip() or last
            continue
        if record is not None:
            found[_shape(f"{record} | {last}" if last != record else record)] += 1
        record = (
            line.split("trace=", 1)[-1].split(" ", 1)[-1].strip() if match.group(1) in ("ERROR", "CRITICAL") else None
        )
        last = record or ""
    return found


@dataclass
class Report:
    """One fuzz session: the answers, each tier's peak memory, what is wrong afterwards, and the errors
    the tiers logged."""

    tally: Tally
    peaks: dict[str, int]
    bound: int
    problems: dict[str, str]
    errors: dict[str, Counter[str]]
    killed: set[str] = field(default_factory=set)

    @property
    def failed(self) -> bool:
        """Tells whether a request got a forbidden answer, a tier went past the bound or is unwell."""
        over = any(peak > self.bound for peak in self.peaks.values())
        return bool(self.tally.failures or self.problems or over)

    def summary(self) -> str:
        lines = [self.tally.summary()]
        lines.append(
            "peak memory: "
            + ", ".join(f"{tier} {size / (1 << 20):.0f} MiB" for tier, size in self.peaks.items())
            + f" (bound {self.bound / (1 << 20):.0f} MiB)"
        )
        lines.extend(f"{tier} went past the bound and was killed" for tier in sorted(self.killed))
        unwell = self.killed | set(self.problems)
        lines.extend(
            f"in flight on {case.tier} at the end: {show(case)}"
            for case in self.tally.unfinished
            if case.tier in unwell
        )
        lines.extend(f"afterwards, {tier}: {problem}" for tier, problem in self.problems.items())
        for tier, errors in self.errors.items():
            lines.extend(f"{tier} logged x{count}: {error[:300]}" for error, count in errors.most_common())
        return "\n".join(lines)


async def session(
    workdir: Path,
    *,
    calls: int,
    seed: int,
    seconds: float,
    memory_bound: int = MEMORY_BOUND,
    concurrency: int = 32,
    skip: frozenset[str] = frozenset(),
) -> Report:
    """Starts the three tiers as processes under ``workdir``, fuzzes them (see :func:`fuzz`) while
    watching their memory, checks that they still serve, and stops them."""
    http = HttpServer()
    http.routes["/ok"] = reply(b'{"ok": true}')
    try:
        async with spawned_stack(workdir / "data", dict(os.environ)) as tiers:
            targets = {tier: process.target for tier, process in tiers.items()}
            watch = MemoryWatch({tier: process.process.pid for tier, process in tiers.items()}, memory_bound)
            watching = asyncio.create_task(watch.run())
            try:
                known = await prepare(targets, http.url)
                tally = await fuzz(
                    targets,
                    known,
                    calls=calls,
                    seed=seed,
                    seconds=seconds,
                    concurrency=concurrency,
                    stop=watch.over,
                    skip=skip,
                )
                problems = await still_serving(tiers)
            finally:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
            for tier in problems:
                if tiers[tier].process.returncode is None:
                    tiers[tier].process.kill()  # a frozen tier would never act on the graceful stop's SIGTERM
            errors = {tier: logged_errors(process.lines) for tier, process in tiers.items()}
    finally:
        http.close()
    return Report(tally, watch.peaks, memory_bound, problems, errors, watch.killed)
