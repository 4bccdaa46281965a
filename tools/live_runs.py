"""Many live runs through gRPC: Orchestrate (SQLite) and Execute run as processes of their own and
hold ``--runs`` runs at once, each waiting in a step (``core.sleep``) until a moment after the last
one has started; then every run must complete, and none may fail. Reports how many runs were live at
once, the servers' memory per live run, and how long starting and finishing took.

Everything runs on loopback and stops by itself (``--timeout``).

Usage: ``python -m tools.live_runs [--runs 50000] [--timeout S] [--logs DIR] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tierstack.client import MonitorClient, OrchestratorClient
from tierstack.core.values import to_struct
from tierstack.v1 import orchestrator_service_pb2 as pb
from tools.bench.processes import tiers_2_and_3

#: How many StartRun calls are in flight at once.
STARTING = 64
#: Runs started per second assumed when choosing how long each run waits (a slower machine still
#: finishes; it holds fewer runs at once, which the report says).
_ASSUMED_START_RATE = 150.0

WORKFLOW = pb.Workflow(
    name="live",
    inputs=[pb.WorkflowInput(name="seconds", type=pb.INPUT_TYPE_NUMBER)],
    steps=[
        pb.WorkflowStep(id="wait", tool="core.sleep", parameters=to_struct({"seconds": "{{ inputs.seconds }}"})),
        pb.WorkflowStep(id="after", tool="core.echo", parameters=to_struct({"value": "done"}), depends_on=["wait"]),
    ],
)


@dataclass
class Report:
    """What one round found."""

    runs: int
    most_live: int
    start_seconds: float
    finish_seconds: float
    rss_per_live_run_kib: dict[str, float]
    ended: dict[str, int]
    failed_to_start: int

    @property
    def failures(self) -> int:
        unfinished = sum(count for state, count in self.ended.items() if state != "RUN_STATE_COMPLETED")
        return self.failed_to_start + unfinished


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def _states(monitor: MonitorClient) -> dict[str, int]:
    [tier] = (await monitor.get_metrics("-")).tiers
    return dict(tier.orchestrate.runs_by_state)


async def live_runs(count: int, data_dir: Path, *, timeout: float = 3600.0, logs: Path | None = None) -> Report:
    """Holds ``count`` runs live at once through the servers and waits for every one to end; the
    servers' logs go to the folder ``logs`` when given."""
    async with (
        tiers_2_and_3(data_dir, logs=logs) as tiers,
        OrchestratorClient(tiers.orchestrate_target) as client,
        MonitorClient(tiers.orchestrate_target) as monitor,
    ):
        servers = {"orchestrate": tiers.orchestrate.pid, "execute": tiers.execute.pid}
        before = {name: _rss(pid) for name, pid in servers.items()}
        wake = time.monotonic() + count / _ASSUMED_START_RATE + 10.0
        failed_to_start = 0
        most_live = 0
        numbers = iter(range(count))

        all_started = asyncio.Event()

        async def watch() -> dict[str, int]:
            """Follows the runs' states until all have started and none is live, keeping the most live
            at once."""
            nonlocal most_live
            while True:
                states = await _states(monitor)
                live = states.get("RUN_STATE_RUNNING", 0) + states.get("RUN_STATE_PENDING", 0)
                most_live = max(most_live, live)
                if not live and all_started.is_set():
                    return states
                await asyncio.sleep(0.5)

        async def starter() -> None:
            nonlocal failed_to_start
            for _ in numbers:
                seconds = max(0.5, wake - time.monotonic())
                try:
                    await client.start_run(
                        pb.StartRunRequest(workflow=WORKFLOW, inputs=to_struct({"seconds": round(seconds, 3)}))
                    )
                except Exception:  # counted: a run that could not start is a failure of the round
                    failed_to_start += 1

        began = time.monotonic()
        async with asyncio.timeout(timeout), asyncio.TaskGroup() as group:
            watching = group.create_task(watch())
            await asyncio.gather(*(starter() for _ in range(STARTING)))
            start_seconds = time.monotonic() - began
            held = {name: _rss(pid) - before[name] for name, pid in servers.items()}
            all_started.set()
        states = watching.result()
        finish_seconds = time.monotonic() - began - start_seconds
    live = max(most_live, 1)
    return Report(
        runs=count,
        most_live=most_live,
        start_seconds=round(start_seconds, 1),
        finish_seconds=round(finish_seconds, 1),
        rss_per_live_run_kib={name: round(growth / live / 1024, 1) for name, growth in held.items()},
        ended={state: n for state, n in states.items() if n},
        failed_to_start=failed_to_start,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50_000)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before the round gives up")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--logs", type=Path, help="a folder to keep the servers' logs in")
    arguments = parser.parse_args()
    if arguments.logs:
        arguments.logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as data:
        try:
            report = asyncio.run(live_runs(arguments.runs, Path(data), timeout=arguments.timeout, logs=arguments.logs))
        except TimeoutError:
            sys.exit(f"the runs did not all end within {arguments.timeout:g} s")
    text = json.dumps({**asdict(report), "failures": report.failures}, indent=2)
    print(text)
    if arguments.json:
        arguments.json.write_text(text)
    sys.exit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
