"""Tier 2, process intelligence: workflows, their plans, runs and run storage."""

from tierstack.server.orchestrate.context import RunContext
from tierstack.server.orchestrate.engine import RunManager, StepRunner
from tierstack.server.orchestrate.persistence import EventLog
from tierstack.server.orchestrate.planner import Plan, Planner
from tierstack.server.orchestrate.service import OrchestrateService
from tierstack.server.orchestrate.store import MemoryRunStore, RunStore, SqliteRunStore, StoredRun
from tierstack.server.orchestrate.workflow import StepSpec, WorkflowSpec, check_workflow

__all__ = [
    "EventLog",
    "MemoryRunStore",
    "OrchestrateService",
    "Plan",
    "Planner",
    "RunContext",
    "RunManager",
    "RunStore",
    "SqliteRunStore",
    "StepRunner",
    "StepSpec",
    "StoredRun",
    "WorkflowSpec",
    "check_workflow",
]
