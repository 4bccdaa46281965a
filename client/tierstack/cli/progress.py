"""Live progress of runs and goals in the terminal: one bar per running step."""

from __future__ import annotations

from types import TracebackType
from typing import Self

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from tierstack.core.budgets import describe_warning
from tierstack.v1 import orchestrator_service_pb2 as orchestrator_pb


class RunProgress:
    """Shows a bar per step of a run, advanced by the step's tool calls, and logs the outcome."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._bars: dict[str, TaskID] = {}

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()

    def log(self, message: str) -> None:
        """Prints a line above the bars."""
        self._progress.console.print(message, highlight=False)

    def update(self, event: orchestrator_pb.RunEvent, label: str = "") -> None:
        """Reflects one run event; ``label`` names the step for people (defaults to its id)."""
        kind = event.WhichOneof("payload")
        if kind == "run_started":
            started = event.run_started
            self.log(f"run {event.run_id} started: {started.workflow_name} ({started.step_count} steps)")
        elif kind == "step_started":
            step_id = event.step_started.step_id
            self._bars[step_id] = self._progress.add_task(label or step_id, total=1, status="running")
        elif kind == "step_execution":
            execution = event.step_execution.event
            bar = self._bars.get(event.step_execution.step_id)
            if bar is None:
                return
            inner = execution.WhichOneof("payload")
            if inner == "started":
                self._progress.update(bar, total=max(execution.started.tool_call_count, 1))
            elif inner == "tool_call_finished":
                self._progress.advance(bar)
            elif inner == "approval_required":
                waiting = execution.approval_required
                self.log(f"[yellow]{waiting.tool} waits for approval[/] (approval id {waiting.approval_id})")
        elif kind == "step_completed":
            step_id = event.step_completed.step_id
            self._progress.update(
                self._bars[step_id],
                completed=self._progress.tasks[self._bars[step_id]].total,
                status="[green]done",
            )
        elif kind == "step_failed":
            failed = event.step_failed
            self._progress.update(self._bars[failed.step_id], status="[red]failed")
            self.log(f"[red]step {failed.step_id} failed:[/] {failed.error.reason}: {failed.error.message}")
        elif kind == "budget_warning":
            self.log(f"[yellow]run {event.run_id} budget:[/] {describe_warning(event.budget_warning)}")
        elif kind == "run_failed":
            self.log(f"[red]run failed:[/] {event.run_failed.error.reason}: {event.run_failed.error.message}")
        elif kind == "run_cancelled":
            self.log(f"[yellow]run cancelled:[/] {event.run_cancelled.reason}")
