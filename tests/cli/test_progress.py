"""What the command line shows of a run's and a goal's events."""

from __future__ import annotations

import io

from rich.console import Console

from tierstack.cli.main import _show_event
from tierstack.cli.progress import RunProgress
from tierstack.v1 import common_pb2
from tierstack.v1 import coordinator_service_pb2 as coordinator_pb
from tierstack.v1 import orchestrator_service_pb2 as orchestrator_pb


def test_budget_warnings_are_shown_in_words() -> None:
    out = io.StringIO()
    tokens = common_pb2.BudgetWarning(budget="tokens", used=85, limit=100, percent=80)
    calls = common_pb2.BudgetWarning(budget="tool_calls", used=19, limit=20, percent=95)
    time = common_pb2.BudgetWarning(budget="duration", used=24.0625, limit=30, percent=80)
    with RunProgress(Console(file=out, width=200)) as view:
        view.update(orchestrator_pb.RunEvent(run_id="r1", budget_warning=tokens))
        view.update(orchestrator_pb.RunEvent(run_id="r1", budget_warning=calls))
        _show_event(view, coordinator_pb.GoalEvent(goal_id="g1", budget_warning=time), {})
    assert [line for line in out.getvalue().splitlines() if line] == [
        "run r1 budget: 80 % of the tokens used: 85 of 100",
        "run r1 budget: 95 % of the tool calls used: 19 of 20",
        "goal budget: 80 % of the time used: 24.1 s of 30 s",
    ]
