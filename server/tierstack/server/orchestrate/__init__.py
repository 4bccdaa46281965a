"""Tier 2, process intelligence: plans of workflows (their specs are in ``tierstack.core.workflow``),
runs and run storage."""

from tierstack.server.orchestrate.context import RunContext
from tierstack.server.orchestrate.engine import RunManager, StepRunner
from tierstack.server.orchestrate.persistence import EventLog
from tierstack.server.orchestrate.planner import Plan, Planner
from tierstack.server.orchestrate.store import MemoryRunStore, RunStore, SqliteRunStore, StoredRun

__all__ = [
    "EventLog",
    "MemoryRunStore",
    "Plan",
    "Planner",
    "RunContext",
    "RunManager",
    "RunStore",
    "SqliteRunStore",
    "StepRunner",
    "StoredRun",
]
