"""Tier 2, process intelligence: workflows, their plans, runs and run storage."""

from tierstack.server.orchestrate.engine import RunManager, StepRunner
from tierstack.server.orchestrate.planner import Plan, Planner
from tierstack.server.orchestrate.service import OrchestrateService
from tierstack.server.orchestrate.store import RunStore, SqliteRunStore, StoredRun
from tierstack.server.orchestrate.workflow import StepSpec, WorkflowSpec, check_workflow

__all__ = [
    "OrchestrateService",
    "Plan",
    "Planner",
    "RunManager",
    "RunStore",
    "SqliteRunStore",
    "StepRunner",
    "StepSpec",
    "StoredRun",
    "WorkflowSpec",
    "check_workflow",
]
