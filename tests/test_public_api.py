"""Each package's ``__all__`` lists exactly its public names, and every one of them resolves."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = {
    "tierstack.client": {
        "AlreadyExistsError",
        "CancelledError",
        "CoordinatorClient",
        "DeadlineExceededError",
        "ExecutorClient",
        "FailedPreconditionError",
        "FieldViolation",
        "InternalError",
        "InvalidArgumentError",
        "MonitorClient",
        "NotFoundError",
        "OrchestratorClient",
        "ResourceExhaustedError",
        "TierstackError",
        "UnavailableError",
    },
    "tierstack.server": {
        "BindError",
        "DEFAULT_PORTS",
        "TIERS",
        "Settings",
        "TierServer",
        "TierService",
        "serve_until_signalled",
        "service_for",
    },
    "tierstack.server.execute": {
        "ENTRY_POINT_GROUP",
        "ExecuteService",
        "Executor",
        "Tool",
        "ToolContext",
        "ToolError",
        "ToolRegistry",
        "ToolSource",
        "schema_of",
        "tool",
    },
    "tierstack.server.orchestrate": {
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
    },
    "tierstack.server.coordinate": {
        "AgentSpec",
        "CoordinateService",
        "Coordinator",
        "Decomposer",
        "EmbeddingIndex",
        "GoalIndex",
        "GoalJournal",
        "GoalMemory",
        "GoalStore",
        "GoalTemplate",
        "LocalProvider",
        "MemoryGoalStore",
        "Need",
        "NgramIndex",
        "SqliteGoalStore",
        "SubtaskSpec",
        "Team",
        "WorkflowRunner",
        "Written",
        "form_team",
        "load_templates",
    },
    "tierstack.cli": {"main"},
    "tierstack.server.ai": {
        "AIService",
        "Completion",
        "CompletionRequest",
        "Ledger",
        "LocalModel",
        "Message",
        "ModelError",
        "ModelProvider",
        "ModelTool",
        "OpenAICompatibleModel",
        "Price",
        "Resilience",
        "ResponseCache",
        "Scope",
        "ToolCallRequest",
        "Totals",
        "Usage",
    },
}


@pytest.mark.parametrize("name", sorted(PACKAGES))
def test_all_is_the_public_surface(name: str) -> None:
    module = importlib.import_module(name)
    assert set(module.__all__) == PACKAGES[name]
    for public in module.__all__:
        assert getattr(module, public) is not None
