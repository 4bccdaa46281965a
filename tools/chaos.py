"""Chaos: workflows and goals keep arriving while a random tier (Coordinate, Orchestrate or Execute)
is killed with SIGKILL at a random moment and restarted, again and again; then every run and goal
must have completed with every output, no step may be recorded completed twice, every run's and
goal's history must replay without a gap, and no step that Execute had finished may have had its
side effect twice (only a step in flight when Execute died may run again).

The steps call an HTTP endpoint on 127.0.0.1 that counts its calls. Everything runs on loopback and
stops by itself.

With ``--replicas N`` every tier runs N times on one PostgreSQL database (a server of the round's
own): a killed replica's runs and goals are taken over by whichever replica finds its lease passed,
and the clients balance their calls over the replicas that serve.

Usage: ``python -m tools.chaos [--kills 100] [--runs 200] [--goals 50] [--replicas N] [--seed N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg
from google.protobuf.message import Message

from tierstack.client import CoordinatorClient, OrchestratorClient, TierstackError
from tierstack.core.values import JSON, from_value, to_struct
from tierstack.server.execute.store import unpack_events
from tierstack.v1 import coordinator_service_pb2 as coordinator_pb
from tierstack.v1 import orchestrator_service_pb2 as pb
from tools.postgres import LocalPostgres

_READY = re.compile(r"serving on (\S+)")
STEPS = {"a": (), "b": ("a",), "c": ("a",), "d": ("b", "c")}


class _Endpoint(ThreadingHTTPServer):
    """Counts each path it is called on, and answers after a short pause."""

    daemon_threads = True
    request_queue_size = 256

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.lock = lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with lock:
                    self.server.hits[self.path] += 1  # type: ignore[attr-defined]
                time.sleep(0.02)
                body = json.dumps({"path": self.path}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class _Tier:
    """One tier as a ``tierstack serve`` process on a fixed port, to kill and start again."""

    name: str
    port: int
    arguments: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    process: asyncio.subprocess.Process | None = None
    restarts: list[float] = field(default_factory=list)
    #: What each life of the process logged, kept for a round that fails.
    logs: list[str] = field(default_factory=list)

    async def start(self) -> float:
        """Starts the tier and returns how long it took to serve, in seconds."""
        begin = time.perf_counter()
        command = [sys.executable, "-m", "tierstack.cli", "serve", self.name, "--port", str(self.port)]
        self.process = await asyncio.create_subprocess_exec(
            *command,
            "--metrics-port",
            "0",
            *self.arguments,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **self.env},
        )
        assert self.process.stderr is not None
        said: list[str] = []
        async for raw in self.process.stderr:
            said.append(raw.decode(errors="replace"))
            if _READY.search(said[-1]):
                break
        else:
            raise RuntimeError(f"{self.name} exited before serving:\n{''.join(said[-20:])}")
        self._said = said
        self._drain = asyncio.create_task(self.process.stderr.read())
        return time.perf_counter() - begin

    async def _ended(self) -> None:
        rest = await self._drain
        self.logs.append("".join(self._said) + rest.decode(errors="replace"))

    async def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        await self.process.wait()
        await self._ended()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            await self.process.wait()
            await self._ended()


@dataclass
class Report:
    """What a chaos round did and found."""

    kills: Counter[str] = field(default_factory=Counter)
    restart_seconds: dict[str, list[float]] = field(default_factory=dict)
    runs: int = 0
    completed: int = 0
    goals: int = 0
    goals_completed: int = 0
    steps_completed_twice: int = 0
    history_gaps: int = 0
    missing_outputs: int = 0
    twice: list[str] = field(default_factory=list)  # endpoints of steps Execute had finished: must be none
    not_completed: list[str] = field(default_factory=list)  # each run or goal that ended otherwise, and how
    crashes: list[str] = field(default_factory=list)  # the tracebacks the tiers logged: must be none
    reruns_in_flight: int = 0  # steps in flight when Execute died, run again: allowed
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        """Says whether nothing was lost or done twice."""
        return (
            self.completed == self.runs
            and self.goals_completed == self.goals
            and not (self.steps_completed_twice or self.history_gaps or self.missing_outputs or self.twice)
            and not self.crashes
        )

    def summary(self) -> dict[str, Any]:
        return {
            "kills": dict(self.kills),
            "restart_ms": {
                tier: {"p50": round(statistics.median(s) * 1000), "max": round(max(s) * 1000)}
                for tier, s in self.restart_seconds.items()
                if s
            },
            "runs": self.runs,
            "completed": self.completed,
            "goals": self.goals,
            "goals_completed": self.goals_completed,
            "steps_completed_twice": self.steps_completed_twice,
            "history_gaps": self.history_gaps,
            "missing_outputs": self.missing_outputs,
            "side_effects_twice": self.twice,
            "not_completed": self.not_completed,
            "crashes": self.crashes,
            "reruns_in_flight": self.reruns_in_flight,
            "seconds": round(self.seconds, 1),
        }


async def _finished_paths(data_dir: Path, store_url: str) -> set[str]:
    """Returns the endpoint paths of the executions Execute has stored as finished (read while the
    killed one is down): each http.request call's result names the path it called."""
    if store_url:
        connection = await asyncpg.connect(store_url)
        try:
            blobs = [row["events"] for row in await connection.fetch("SELECT events FROM executions")]
        finally:
            await connection.close()
    else:
        database = data_dir / "execute" / "executions.sqlite3"
        async with aiosqlite.connect(database) as db, db.execute("SELECT events FROM executions") as rows:
            blobs = [row[0] for row in await rows.fetchall()]
    called = set()
    for blob in blobs:
        for event in unpack_events(blob):
            if event.HasField("tool_call_finished"):
                called.add(_called(from_value(event.tool_call_finished.result.output)))
    return {path for path in called if isinstance(path, str)}


async def _retrying(call: Any, *args: Any) -> Any:
    """Calls a tier until it answers: it may be down for a moment."""
    while True:
        try:
            return await call(*args)
        except TierstackError as exc:
            if exc.code.name != "UNAVAILABLE":
                raise
            await asyncio.sleep(0.1)


async def _history(watch: Callable[[], AsyncIterator[Message]], *, passing: Sequence[str]) -> list[Any]:
    """Returns the whole history ``watch`` streams once its run or goal has ended, watching again
    after a stream dropped with one of the ``passing`` status codes."""
    while True:
        try:
            events = [event async for event in watch()]
            if events and events[-1].WhichOneof("payload") in _ENDINGS:
                return events
        except TierstackError as exc:
            if exc.code.name not in passing:
                raise
        await asyncio.sleep(0.1)


#: The codes a watch drops with while a tier restarts (a goal's watch also when another owner took it
#: up: FAILED_PRECONDITION).
_DROPPED = ("UNAVAILABLE", "CANCELLED")
#: The last event of a run or a goal that has ended.
_ENDINGS = {f"{kind}_{end}" for kind in ("run", "goal") for end in ("completed", "failed", "cancelled")}


async def chaos(
    *,
    kills: int,
    runs: int,
    goals: int,
    seed: int,
    data_dir: Path,
    tiers: Sequence[str] = ("coordinate", "orchestrate", "execute"),
    replicas: int = 1,
    store_url: str = "",
) -> Report:
    """Runs one chaos round and returns what it found: ``replicas`` of each tier, on the PostgreSQL
    database ``store_url`` (needed for more than one), or on SQLite files in ``data_dir``."""
    rng = random.Random(seed)
    endpoint = _Endpoint()
    threading.Thread(target=endpoint.serve_forever, daemon=True).start()
    # Replicas share the store and Execute's workspaces; a replica killed comes back under a new name,
    # so its runs and goals are taken over once their leases pass, by whichever replica is first.
    shared = {"TIERSTACK_STORE_URL": store_url, "TIERSTACK_LEASE_SECONDS": "2"} if store_url else {}
    ports = {tier: [_free_port() for _ in range(replicas)] for tier in ("execute", "orchestrate", "coordinate")}
    targets = {tier: ",".join(f"127.0.0.1:{port}" for port in tier_ports) for tier, tier_ports in ports.items()}
    arguments = {
        "execute": ("--data-dir", str(data_dir / "execute")),
        "orchestrate": ("--execute-target", targets["execute"], "--data-dir", str(data_dir / "orchestrate")),
        "coordinate": ("--orchestrate-target", targets["orchestrate"], "--execute-target", targets["execute"]),
    }
    processes: dict[str, list[_Tier]] = {
        tier: [
            _Tier(
                tier,
                port,
                # Each Coordinate learns in a goal memory of its own.
                (*arguments[tier], "--data-dir", str(data_dir / f"{tier}-{k}"))
                if tier == "coordinate"
                else arguments[tier],
                # Each goal calls paths of its own: a similar past goal's subtasks are not reused as they are.
                # The tools call the endpoint on loopback, which they may reach only when allowed.
                {**shared, "TIERSTACK_SIMILARITY_THRESHOLD": "2", "TIERSTACK_HTTP_ALLOWED_NETWORKS": "127.0.0.0/8"},
            )
            for k, port in enumerate(tier_ports)
        ]
        for tier, tier_ports in ports.items()
    }
    report = Report(runs=runs, goals=goals)
    begin = time.perf_counter()
    workflow = pb.Workflow(
        name="chaos",
        steps=[
            pb.WorkflowStep(
                id=name,
                tool="http.request",
                depends_on=deps,
                parameters=to_struct({"url": f"{endpoint.url}/hit/{{{{inputs.tag}}}}/{name}"}),
            )
            for name, deps in STEPS.items()
        ],
    )
    agents = [coordinator_pb.Agent(id="scout", capabilities=["http", "general"], max_concurrent_tasks=4)]
    in_flight_at_a_kill: set[str] = set()  # paths called but not finished when Execute died
    tags: dict[str, str] = {}
    goal_tags: dict[str, str] = {}
    try:
        for tier in ("execute", "orchestrate", "coordinate"):
            for replica in processes[tier]:
                await replica.start()
        async with (
            OrchestratorClient(targets["orchestrate"]) as client,
            CoordinatorClient(targets["coordinate"]) as coordinator,
        ):

            async def pursue() -> None:
                for number in range(goals):
                    hit = f"{endpoint.url}/hit/g{number}"
                    text = f"fetch {hit}/a and fetch {hit}/b, then fetch {hit}/c"
                    request = coordinator_pb.StartGoalRequest(
                        request_id=f"chaos-goal-{number}", goal=text, agents=agents
                    )
                    started = await _retrying(coordinator.start_goal, request)
                    goal_tags[started.goal.goal_id] = f"g{number}"
                    await asyncio.sleep(rng.uniform(0, 0.05))

            async def submit() -> None:
                for number in range(runs):
                    request = pb.StartRunRequest(
                        request_id=f"chaos-{number}", workflow=workflow, inputs=to_struct({"tag": f"r{number}"})
                    )
                    started = await _retrying(client.start_run, request)
                    tags[started.run.run_id] = f"r{number}"
                    await asyncio.sleep(rng.uniform(0, 0.02))

            submitting = asyncio.gather(submit(), pursue())
            for _ in range(kills):
                await asyncio.sleep(rng.uniform(0.2, 0.8))
                name = rng.choice(list(tiers))
                victim = rng.choice(processes[name])
                await victim.kill()
                report.kills[name] += 1
                done: set[str] = set()
                if name == "execute":  # a dead Execute stores nothing more (and another may go on)
                    done = await _finished_paths(data_dir, store_url)
                report.restart_seconds.setdefault(name, []).append(await victim.start())
                if name == "execute":
                    # Until the new Execute serves, every call reaching the endpoint is one the dead
                    # one made (however late the endpoint reads it); the new one calls only once asked.
                    with endpoint.lock:
                        called = set(endpoint.hits)
                    in_flight_at_a_kill |= called - done
            await submitting
            histories = {run_id: await _history(partial(client.watch_run, run_id), passing=_DROPPED) for run_id in tags}
            goal_histories = {
                goal_id: await _history(
                    partial(coordinator.watch_goal, goal_id), passing=(*_DROPPED, "FAILED_PRECONDITION")
                )
                for goal_id in goal_tags
            }
    finally:
        for tier in ("coordinate", "orchestrate", "execute"):
            for replica in processes[tier]:
                await replica.stop()
        endpoint.shutdown()
        endpoint.server_close()
    for run_id, history in histories.items():
        tag = tags[run_id]
        last = history[-1]
        if not last.HasField("run_completed"):
            report.not_completed.append(f"{tag}: {_ending(last)}")
        if last.HasField("run_completed"):
            report.completed += 1
            outputs = {name: from_value(value) for name, value in last.run_completed.outputs.items()}
            expected = {name: f"/hit/{tag}/{name}" for name in STEPS}
            got = {name: _called(output) for name, output in outputs.items()}
            report.missing_outputs += got != expected
        completions = Counter(e.step_completed.step_id for e in history if e.HasField("step_completed"))
        report.steps_completed_twice += sum(count > 1 for count in completions.values())
        report.history_gaps += [e.sequence for e in history] != list(range(1, len(history) + 1))
        for name in STEPS:
            path = f"/hit/{tag}/{name}"
            if endpoint.hits[path] > 1:
                if path in in_flight_at_a_kill:
                    report.reruns_in_flight += 1
                else:
                    report.twice.append(path)
    for goal_id, goal_events in goal_histories.items():
        tag = goal_tags[goal_id]
        ended = goal_events[-1]
        if not ended.HasField("goal_completed"):
            report.not_completed.append(f"{tag}: {_ending(ended)}")
        if ended.HasField("goal_completed"):
            report.goals_completed += 1
            paths = sorted(str(_called(from_value(value))) for value in ended.goal_completed.outputs.values())
            report.missing_outputs += paths != [f"/hit/{tag}/{name}" for name in "abc"]
        report.history_gaps += [e.sequence for e in goal_events] != list(range(1, len(goal_events) + 1))
        finished = Counter(e.subtask_finished.subtask_id for e in goal_events if e.subtask_finished.success)
        report.steps_completed_twice += sum(count > 1 for count in finished.values())
        for name in "abc":
            path = f"/hit/{tag}/{name}"
            if endpoint.hits[path] > 1:
                if path in in_flight_at_a_kill:
                    report.reruns_in_flight += 1
                else:
                    report.twice.append(path)
    for tier, replicas_of_tier in processes.items():
        for replica in replicas_of_tier:
            for log in replica.logs:
                report.crashes.extend(f"{tier}: {trace}" for trace in _tracebacks(log))
    report.seconds = time.perf_counter() - begin
    return report


def _tracebacks(log: str) -> list[str]:
    """Returns each traceback in a tier's log, from the record that logged it to the exception."""
    lines = log.splitlines()
    found = []
    for number, line in enumerate(lines):
        if line.startswith("Traceback"):
            end = next((n for n in range(number + 1, len(lines)) if not lines[n].startswith((" ", "\t"))), number)
            found.append("\n".join(lines[max(0, number - 1) : end + 1])[-3000:])
    return found


def _ending(event: Any) -> str:
    """Says how a run or a goal that did not complete ended: its last event's kind and error."""
    kind = event.WhichOneof("payload")
    error = getattr(getattr(event, kind), "error", None)
    return f"{kind} {error.reason}: {error.message}" if error is not None else str(kind)


def _called(output: JSON) -> object:
    """Returns the path an http.request step's output says it called."""
    body = output.get("json") if isinstance(output, dict) else None
    return body.get("path") if isinstance(body, dict) else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--goals", type=int, default=50)
    parser.add_argument("--replicas", type=int, default=1, help="of each tier, on a PostgreSQL of the round's own")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--json", help="also write the figures to this file")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tierstack-chaos-") as folder, contextlib.ExitStack() as stack:
        store_url = stack.enter_context(LocalPostgres()).url if arguments.replicas > 1 else ""
        report = asyncio.run(
            chaos(
                kills=arguments.kills,
                runs=arguments.runs,
                goals=arguments.goals,
                seed=arguments.seed,
                data_dir=Path(folder),
                replicas=arguments.replicas,
                store_url=store_url,
            )
        )
    summary = json.dumps({"seed": arguments.seed, **report.summary()}, indent=2)
    print(summary)
    if arguments.json:
        Path(arguments.json).write_text(summary + "\n")
    return 0 if report.clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
