"""``tierstack``: serve one tier, bring up all three, run a workflow file, or pursue a goal."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tierstack.cli.progress import RunProgress
from tierstack.client import CoordinatorClient, InvalidArgumentError, OrchestratorClient, TierstackError, Tls
from tierstack.client.defaults import TIERS, default_target
from tierstack.core.budgets import describe_warning
from tierstack.core.values import from_value
from tierstack.v1 import common_pb2
from tierstack.v1 import coordinator_service_pb2 as coordinator_pb
from tierstack.v1 import orchestrator_service_pb2 as orchestrator_pb

_DEFAULT_AGENTS = ("researcher=http,general", "analyst=analysis,general", "writer=writing,general")


def _default_target(tier: str) -> str:
    return os.environ.get(f"TIERSTACK_{tier.upper()}_TARGET", default_target(tier))


def _serve(args: argparse.Namespace) -> int:
    import uvloop

    from tierstack.server import BindError, Settings, serve_until_signalled
    from tierstack.server.correlation import configure_logging

    configure_logging(os.environ.get("TIERSTACK_LOG_LEVEL", "INFO").upper())
    env = dict(os.environ)
    if args.host is not None:
        env["TIERSTACK_HOST"] = args.host
    if args.insecure:
        env["TIERSTACK_INSECURE"] = "1"
    try:
        settings = Settings.from_env(args.tier, env)
    except (OSError, ValueError) as exc:  # a setting or a TLS file: one line, no traceback
        print(f"error: {args.tier}: {exc}", file=sys.stderr)
        return 2
    overrides = {
        "port": args.port,
        "metrics_port": args.metrics_port,
        "execute_target": args.execute_target,
        "orchestrate_target": args.orchestrate_target,
        "data_dir": args.data_dir,
    }
    settings = replace(settings, **{key: value for key, value in overrides.items() if value is not None})
    try:
        uvloop.run(serve_until_signalled(args.tier, settings))
    except BindError as exc:  # one line a supervisor (``tierstack up``) can pass on; no traceback
        print(f"error: {args.tier} {exc}", file=sys.stderr)
        return 1
    return 0


#: The line a server logs once it serves (see :class:`tierstack.server.TierServer`).
_READY = re.compile(r"tierstack TIER_\w+ serving on \S+")
#: How long ``up`` waits for a tier to serve.
_START_SECONDS = 60.0


class _Child:
    """A tier served by a child process; its stderr is passed on to ours line by line and watched for
    the line that says it serves."""

    def __init__(self, tier: str, command: Sequence[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
        self._ready = threading.Event()
        self._last_line = ""
        self._reader = threading.Thread(target=self._forward, name=f"{tier}-stderr", daemon=True)
        self._reader.start()

    def _forward(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            line = raw.decode(errors="replace")
            sys.stderr.write(line)
            sys.stderr.flush()
            if line.strip():
                self._last_line = line.strip()
            if _READY.search(line):
                self._ready.set()

    def serving(self, seconds: float) -> bool:
        """Waits until the child says it serves; False if it exits first or time runs out."""
        deadline = time.monotonic() + seconds
        while not self._ready.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                return False
        return True

    def reason(self) -> str:
        """Returns the child's last line on stderr: once it has exited, why it did."""
        self._reader.join(timeout=5.0)
        return self._last_line

    def finish(self) -> None:
        """Asks the child to stop (SIGTERM), and kills it when it does not within 15 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=5.0)


#: Replica ``k`` of a tier started by ``up`` listens on the tier's ports plus ``k`` times this.
_REPLICA_PORT_STEP = 100


def _up(args: argparse.Namespace) -> int:
    """Starts the three tiers as child processes (``--replicas`` of each), each tier once the tier
    below serves, and stops them all on Ctrl-C or SIGTERM, or when one of them exits."""
    from tierstack.server.config import Settings

    console = Console(stderr=True)
    store = args.store or os.environ.get("TIERSTACK_STORE_URL", "")
    if args.replicas > 1 and not store.startswith(("postgresql://", "postgres://")):
        console.print("[red]error:[/] replicas share their store: --replicas needs --store postgresql://…")
        return 2
    replicas = range(args.replicas)
    ports = {tier: [Settings.from_env(tier).port + _REPLICA_PORT_STEP * k for k in replicas] for tier in TIERS}
    env = {
        "TIERSTACK_EXECUTE_TARGET": ",".join(f"127.0.0.1:{port}" for port in ports["execute"]),
        "TIERSTACK_ORCHESTRATE_TARGET": ",".join(f"127.0.0.1:{port}" for port in ports["orchestrate"]),
        **os.environ,
        **({"TIERSTACK_STORE_URL": store} if store else {}),
    }
    command = [sys.executable, "-m", "tierstack.cli", "serve"]
    extra = ["--data-dir", str(args.data_dir)] if args.data_dir else []
    children: dict[str, _Child] = {}

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    status = 0
    try:
        for tier in reversed(TIERS):  # bottom up: each tier's callee serves before it starts
            for k in replicas:
                name = tier if args.replicas == 1 else f"{tier}-{k}"
                own = ["--port", str(ports[tier][k])]
                if args.replicas > 1:  # each replica its own metrics port and its own name as an owner
                    metrics = Settings.from_env(tier).metrics_port
                    own += ["--metrics-port", str(metrics + _REPLICA_PORT_STEP * k if metrics else 0)]
                replica_env = {**env, "TIERSTACK_REPLICA_ID": name} if args.replicas > 1 else env
                child = children[name] = _Child(name, [*command, tier, *own, *extra], replica_env)
                # Its own line, not a health check on the port: another server may hold the port.
                if not child.serving(_START_SECONDS):
                    if child.process.poll() is None:
                        console.print(
                            f"[red]{name} did not start serving within {_START_SECONDS:g} s; stopping the stack"
                        )
                    else:
                        console.print(
                            f"[red]{name} failed to start:[/] {escape(child.reason())}; stopping the stack",
                            soft_wrap=True,
                        )
                    return 1
        listening = ", ".join(f"{tier} :{','.join(map(str, tier_ports))}" for tier, tier_ports in ports.items())
        console.print(f"tierstack is up: {listening} (Ctrl-C stops it)")
        while status == 0:
            for tier, child in children.items():
                if child.process.poll() is not None:
                    console.print(
                        f"[red]{tier} exited with status {child.process.returncode}:[/] {escape(child.reason())}; "
                        "stopping the stack",
                        soft_wrap=True,
                    )
                    status = 1
            time.sleep(0.2)
    except KeyboardInterrupt:
        console.print("stopping tierstack …")
    finally:
        for child in children.values():
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        for child in children.values():
            child.finish()
    return status


def _report_error(console: Console, error: TierstackError) -> int:
    console.print(f"[red]{error.code.name}[/] {error.reason}: {error.message}")
    for violation in error.violations:
        console.print(f"  {violation.field}: {violation.description}")
    return 2 if isinstance(error, InvalidArgumentError) else 1


def _load_workflow(path: Path) -> orchestrator_pb.Workflow:
    """Reads a workflow file: the JSON mapping of ``Workflow`` in YAML or JSON (see workflow.schema.json)."""
    document = yaml.safe_load(path.read_text())
    if not isinstance(document, dict):
        raise ValueError(f"{path} does not hold a workflow mapping")
    return json_format.ParseDict(document, orchestrator_pb.Workflow())


def _parse_inputs(pairs: Sequence[str]) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    for pair in pairs:
        key, separator, raw = pair.partition("=")
        if not separator:
            raise ValueError(f"--input {pair!r}: expected KEY=VALUE")
        try:
            inputs[key] = json.loads(raw)
        except ValueError:
            inputs[key] = raw
    return inputs


async def _run(args: argparse.Namespace, console: Console) -> int:
    durability = orchestrator_pb.RunDurability.Value(f"RUN_DURABILITY_{args.durability.upper()}")
    request = orchestrator_pb.OrchestrateRequest(
        workflow=_load_workflow(args.workflow),
        durability=durability,
        verbosity=orchestrator_pb.RUN_VERBOSITY_PROGRESS,  # the progress bars show each tool call
    )
    request.inputs.update(_parse_inputs(args.input))
    final: orchestrator_pb.RunEvent | None = None
    async with OrchestratorClient(args.target, tls=args.tls, api_key=args.api_key) as client:
        with RunProgress(console) as view:
            async for event in client.orchestrate(request):
                view.update(event)
                final = event
    if final is not None and final.WhichOneof("payload") == "run_completed":
        outputs = {key: from_value(value) for key, value in final.run_completed.outputs.items()}
        console.print_json(data=outputs)
        if _from_stand_in(outputs):
            console.print(STAND_IN.format(what="model answers from", which="model local"))
        console.print(f"[green]run {final.run_id} completed")
        return 0
    return 1


def _agent(text: str) -> coordinator_pb.Agent:
    """Reads ``--agent NAME=CAP,CAP``.

    Raises:
        argparse.ArgumentTypeError: It names no agent or no capability.
    """
    name, equals, listed = text.partition("=")
    capabilities = [c.strip() for c in listed.split(",") if c.strip()]
    if not equals or not name.strip() or not capabilities:
        raise argparse.ArgumentTypeError(
            f"{text[:64]!r} is not NAME=CAPABILITY[,CAPABILITY…], e.g. writer=writing,general"
        )
    return coordinator_pb.Agent(id=name.strip(), name=name.strip(), capabilities=capabilities, max_concurrent_tasks=4)


async def _goal(args: argparse.Namespace, console: Console) -> int:
    agents = args.agent or [_agent(text) for text in _DEFAULT_AGENTS]
    context = common_pb2.RequestContext(correlation_id=args.correlation_id or "")
    async with CoordinatorClient(args.target, tls=args.tls, api_key=args.api_key) as client:
        if args.detach:
            start = coordinator_pb.StartGoalRequest(context=context, goal=args.goal, agents=agents)
            print((await client.start_goal(start)).goal.goal_id)
            return 0
        request = coordinator_pb.CoordinateRequest(context=context, goal=args.goal, agents=agents)
        return await _follow(client.coordinate(request), console)


async def _follow(events: AsyncIterator[coordinator_pb.GoalEvent], console: Console) -> int:
    """Shows a goal's events as they arrive; returns 0 when the goal completed, else 1."""
    labels: dict[str, str] = {}
    last: coordinator_pb.GoalEvent | None = None
    with RunProgress(console) as view:
        async for event in events:
            _show_event(view, event, labels)
            last = event
    return 0 if last is not None and last.HasField("goal_completed") else 1


#: Said under outputs that the offline stand-in (the ``local`` model, or the rule-based decomposer)
#: produced, which restate their input rather than think.
STAND_IN = (
    "[yellow]{what} the offline stand-in ({which}), which restates its input: point "
    "TIERSTACK_MODEL_BASE_URL and TIERSTACK_MODEL at a model server for real answers (README: A real model)[/]"
)


def _from_stand_in(value: object) -> bool:
    """Says whether an output holds an answer of the local model (``ai.complete``'s ``text`` with
    ``"model": "local"``)."""
    if isinstance(value, dict):
        return (value.get("model") == "local" and "text" in value) or any(_from_stand_in(i) for i in value.values())
    if isinstance(value, list):
        return any(_from_stand_in(item) for item in value)
    return False


def _show_event(view: RunProgress, event: coordinator_pb.GoalEvent, labels: dict[str, str]) -> None:
    kind = event.WhichOneof("payload")
    if kind == "goal_decomposed":
        table = Table("subtask", "description", "needs", "depends on", "tool", title="decomposition")
        for subtask in event.goal_decomposed.subtasks:
            labels[subtask.id] = f"{subtask.id}: {subtask.description}"
            table.add_row(
                subtask.id,
                subtask.description,
                ", ".join(subtask.required_capabilities),
                ", ".join(subtask.dependencies),
                subtask.tool,
            )
        view.console.print(table)
        decomposed = event.goal_decomposed
        if decomposed.producer == "local":
            view.log(STAND_IN.format(what="planned by", which="rules, no model"))
        if decomposed.similar_goal:
            # The goals' own words: printed as written, never read as markup.
            rebound = ", ".join(f"{old} → {new}" for old, new in sorted(decomposed.rebound_particulars.items()))
            reused = f"reused the plan of a similar goal: {decomposed.similar_goal}" + (
                f" ({rebound})" if rebound else ""
            )
            view.log(escape(reused))
    elif kind == "team_formed":
        for assignment in event.team_formed.assignments:
            view.log(f"{assignment.subtask_id} → {assignment.agent_id} (score {assignment.score:.2f})")
    elif kind == "subtask_replanned":
        replanned = event.subtask_replanned
        view.log(
            f"[yellow]{replanned.subtask_id} failed ({replanned.error.reason}); re-planned: "
            f"{replanned.previous_agent_id} → {replanned.agent_id}[/]"
        )
    elif kind == "subtask_progress":
        progress = event.subtask_progress
        view.update(progress.run_event, labels.get(progress.subtask_id, ""))
    elif kind == "goal_resumed":
        view.log(f"[yellow]goal resumed[/] ({event.goal_resumed.reason})")
    elif kind == "budget_warning":
        view.log(f"[yellow]goal budget:[/] {describe_warning(event.budget_warning)}")
    elif kind == "goal_completed":
        outputs = {k: from_value(v) for k, v in event.goal_completed.outputs.items()}
        view.console.print_json(data=outputs)
        if _from_stand_in(outputs):
            view.log(STAND_IN.format(what="model answers from", which="model local"))
        phases = ", ".join(
            f"{name} {duration.ToNanoseconds() / 1e6:.1f} ms"
            for name, duration in sorted(event.goal_completed.phase_durations.items())
        )
        view.log(f"[green]goal completed[/] ({phases}); correlation id {event.correlation_id}")
    elif kind == "goal_failed":
        error = event.goal_failed.error
        view.log(f"[red]goal failed:[/] {error.reason}: {error.message}")
    elif kind == "goal_cancelled":
        view.log(f"[red]goal cancelled:[/] {event.goal_cancelled.reason}")


def _goal_row(goal: coordinator_pb.Goal) -> tuple[str, ...]:
    created = goal.create_time.ToDatetime().isoformat(timespec="seconds") if goal.HasField("create_time") else ""
    state = coordinator_pb.GoalState.Name(goal.state).removeprefix("GOAL_STATE_")
    return goal.goal_id, state, created, goal.request.goal[:60]


async def _goals(args: argparse.Namespace, console: Console) -> int:
    """``tierstack goals list|get|watch|cancel``: the goals a Coordinate server keeps."""
    async with CoordinatorClient(args.target, tls=args.tls, api_key=args.api_key) as client:
        if args.action == "list":
            state = coordinator_pb.GoalState.Value(f"GOAL_STATE_{(args.state or 'unspecified').upper()}")
            page = await client.list_goals(
                coordinator_pb.ListGoalsRequest(page_size=args.page_size, page_token=args.page_token or "", state=state)
            )
            table = Table("goal", "state", "created", "goal text", title="goals")
            for goal in page.goals:
                table.add_row(*_goal_row(goal))
            console.print(table)
            if page.next_page_token:
                console.print(f"more: --page-token {page.next_page_token}")
            return 0
        if args.action == "get":
            goal = await client.get_goal(args.goal_id)
            console.print_json(json_format.MessageToJson(goal))
            return 0
        if args.action == "cancel":
            goal = await client.cancel_goal(args.goal_id, reason=args.reason or "")
            console.print(
                f"goal {goal.goal_id} is {coordinator_pb.GoalState.Name(goal.state).removeprefix('GOAL_STATE_')}"
            )
            return 0
        return await _follow(client.watch_goal(args.goal_id, after_sequence=args.after), console)


def _bench_report(args: argparse.Namespace) -> int:
    """Runs ``tools.bench.report``, which lives in the source tree, not in the installed package."""
    if not Path("tools/bench/report.py").is_file():
        Console(stderr=True).print("[red]error:[/] run bench-report from a tierstack source checkout")
        return 2
    command = [sys.executable, "-m", "tools.bench.report", "--out", str(args.out), *(["--quick"] if args.quick else [])]
    return subprocess.run(command, check=False).returncode


async def _top(args: argparse.Namespace, console: Console) -> int:
    from tierstack.cli.top import top

    await top(
        args.target, interval=args.interval, frames=args.frames, console=console, tls=args.tls, api_key=args.api_key
    )
    return 0


def _migrate(args: argparse.Namespace) -> int:
    """Brings the stores' schema up to date (servers also do so when they start)."""
    from tierstack.server import Settings, stores

    settings = Settings.from_env("orchestrate")
    if args.store is not None:
        settings = replace(settings, store_url=args.store)
    print(asyncio.run(stores.migrate(settings)))
    return 0


_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _keys(args: argparse.Namespace, console: Console) -> int:
    """``tierstack keys create|list|revoke``: the API keys in the store (see TIERSTACK_AUTH)."""
    from tierstack.server import Settings
    from tierstack.server.auth import Role, issue, key_store

    settings = Settings.from_env("orchestrate")
    if args.store is not None:
        settings = replace(settings, store_url=args.store)
    if args.action == "create" and not _TENANT.fullmatch(args.tenant):
        console.print(
            "[red]error:[/] a tenant is 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
        return 2

    async def act() -> int:
        store = key_store(settings)
        await store.open()
        try:
            if args.action == "create":
                issued = issue(args.tenant, Role[args.role.upper()], args.name or "")
                await store.add(issued)
                print(issued.token)  # plain, for scripts: the only time the key is shown
                Console(stderr=True).print(
                    f"key {issued.key.key_id} for {args.tenant} ({args.role}); keep it, it is not shown again"
                )
                return 0
            if args.action == "revoke":
                if await store.revoke(args.key_id):
                    console.print(f"key {args.key_id} revoked")
                    return 0
                console.print(f"[red]error:[/] no live key {escape(args.key_id[:32])}")
                return 1
            table = Table("key", "tenant", "role", "name", "created", "revoked", title="API keys")
            after = ""
            while page := await store.keys(after=after):
                for key in page:
                    created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(key.create_ns / 1e9))
                    table.add_row(
                        key.key_id, key.tenant, key.role.name.lower(), key.name, created, "yes" if key.revoked else ""
                    )
                after = page[-1].key_id
            console.print(table)
            return 0
        finally:
            await store.close()

    return asyncio.run(act())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tierstack", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve one tier")
    serve.add_argument("tier", choices=TIERS)
    serve.add_argument("--host", help="address to bind (TIERSTACK_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind, 0 for any (TIERSTACK_<TIER>_PORT)")
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="serve in plaintext off loopback (TIERSTACK_INSECURE=1); TLS is set by TIERSTACK_TLS_*",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        help="the Prometheus endpoint's port, 0 for a free one (TIERSTACK_<TIER>_METRICS_PORT)",
    )
    serve.add_argument("--execute-target", help="where Orchestrate reaches Execute (TIERSTACK_EXECUTE_TARGET)")
    serve.add_argument(
        "--orchestrate-target", help="where Coordinate reaches Orchestrate (TIERSTACK_ORCHESTRATE_TARGET)"
    )
    serve.add_argument("--data-dir", type=Path, help="where run state is kept (TIERSTACK_DATA_DIR, default .tierstack)")

    keys = commands.add_parser("keys", help="create, list and revoke API keys (TIERSTACK_AUTH=on)")
    key_actions = keys.add_subparsers(dest="action", required=True)
    create = key_actions.add_parser("create", help="make a key and print it (it is shown this once)")
    create.add_argument("--tenant", required=True, help="the tenant whose work the key reaches")
    create.add_argument("--role", choices=["read", "run", "admin", "tier"], default="run", help="what it may do")
    create.add_argument("--name", help="what the key is for")
    key_actions.add_parser("list", help="list the keys (never their secrets)")
    revoke = key_actions.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key_id")
    for key_action in key_actions.choices.values():
        key_action.add_argument(
            "--store", help="the store's URL (TIERSTACK_STORE_URL; SQLite in .tierstack by default)"
        )
    migrate = commands.add_parser("migrate", help="bring the stores' schema up to date")
    migrate.add_argument("--store", help="the store's URL (TIERSTACK_STORE_URL; SQLite in .tierstack by default)")

    up = commands.add_parser("up", help="run all three tiers as separate processes until Ctrl-C")
    up.add_argument("--data-dir", type=Path, help="where run state is kept (default .tierstack)")
    up.add_argument("--store", help="the store's URL (TIERSTACK_STORE_URL; SQLite in the data folder by default)")
    up.add_argument(
        "--replicas",
        type=int,
        default=1,
        choices=range(1, 10),
        metavar="N",
        help="replicas of each tier, on the tiers' ports plus 100 times k (needs a PostgreSQL --store)",
    )

    run = commands.add_parser("run", help="run a workflow file (YAML or JSON) and show its progress")
    run.add_argument("workflow", type=Path)
    run.add_argument("--input", "-i", action="append", default=[], metavar="KEY=VALUE", help="a workflow input")
    run.add_argument("--target", default=_default_target("orchestrate"), help="the Orchestrate server")
    run.add_argument(
        "--durability",
        choices=["async", "sync"],
        default="async",
        help="sync: store each step's completion before its dependents start (default async)",
    )

    goal = commands.add_parser("goal", help="pursue a goal through all three tiers and show its progress")
    goal.add_argument("goal")
    goal.add_argument(
        "--agent",
        action="append",
        type=_agent,
        metavar="NAME=CAP,CAP",
        help="an available agent (repeatable; three by default)",
    )
    goal.add_argument("--correlation-id", help="the id tying the goal's events and logs together")
    goal.add_argument("--detach", action="store_true", help="start the goal, print its id and return")
    goal.add_argument("--target", default=_default_target("coordinate"), help="the Coordinate server")

    goals = commands.add_parser("goals", help="list, show, watch or cancel the goals Coordinate keeps")
    goals.add_argument("--target", default=_default_target("coordinate"), help="the Coordinate server")
    actions = goals.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="list goals, newest first")
    listing.add_argument("--state", choices=["pending", "running", "completed", "failed", "cancelled"])
    listing.add_argument("--page-size", type=int, default=50, help="goals per page (at most 1000)")
    listing.add_argument("--page-token", help="continue a listing")
    for action, text in (("get", "show one goal"), ("watch", "show a goal's events until it ends")):
        chosen = actions.add_parser(action, help=text)
        chosen.add_argument("goal_id")
    actions.choices["watch"].add_argument("--after", type=int, default=0, help="only events after this sequence")
    cancel = actions.add_parser("cancel", help="cancel a goal and its runs")
    cancel.add_argument("goal_id")
    cancel.add_argument("--reason", help="why the goal is cancelled")

    report = commands.add_parser(
        "bench-report", help="run the benchmarks (from a source checkout) and write a markdown table and a chart"
    )
    report.add_argument("--out", type=Path, default=Path("bench-report"), help="the folder to write to")
    report.add_argument("--quick", action="store_true", help="fewer rounds: a rough report in a minute or two")

    top = commands.add_parser("top", help="a live view of the three tiers: rates, latency, runs, alerts")
    top.add_argument("--target", default=_default_target("coordinate"), help="the Coordinate server")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    top.add_argument("--frames", type=int, default=0, help="stop after this many refreshes (0: until Ctrl-C)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 success, 1 failure, 2 bad input)."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "up":
        return _up(args)
    if args.command == "bench-report":
        return _bench_report(args)
    if args.command == "migrate":
        return _migrate(args)
    if args.command == "keys":
        return _keys(args, Console())
    console = Console()
    commands = {"run": _run, "goal": _goal, "goals": _goals, "top": _top}
    try:
        args.tls = Tls.from_env()  # the files are read before the loop runs
        args.api_key = os.environ.get("TIERSTACK_API_KEY", "")
        return asyncio.run(commands[args.command](args, console))
    except KeyboardInterrupt:
        return 0 if args.command == "top" else 130  # Ctrl-C is how top ends
    except TierstackError as exc:
        return _report_error(console, exc)
    except (OSError, ValueError, json_format.ParseError, yaml.YAMLError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
