"""Each package's ``__all__`` lists exactly its public names, and every one of them resolves."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PACKAGES = {
    "tierstack.client": {
        "AlreadyExistsError",
        "CallCancelledError",
        "Code",
        "CoordinatorClient",
        "DeadlineExceededError",
        "ExecutorClient",
        "FailedPreconditionError",
        "InternalError",
        "InvalidArgumentError",
        "MonitorClient",
        "NotFoundError",
        "OrchestratorClient",
        "PermissionDeniedError",
        "ResourceExhaustedError",
        "TierstackError",
        "Tls",
        "UnauthenticatedError",
        "UnavailableError",
        "Violation",
    },
    "tierstack.server": {
        "BindError",
        "DEFAULT_PORTS",
        "TIERS",
        "ServerTls",
        "Settings",
        "TierServer",
        "TierService",
        "serve_until_signalled",
        "service_for",
    },
    "tierstack.server.auth": {
        "ApiKey",
        "Guard",
        "KeyStore",
        "MemoryKeyStore",
        "Principal",
        "Role",
        "SqliteKeyStore",
        "TokenVerifier",
        "current",
        "guard_for",
        "issue",
        "key_store",
    },
    "tierstack.server.execute": {
        "ENTRY_POINT_GROUP",
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
        "Plan",
        "Planner",
        "RunContext",
        "RunManager",
        "RunStore",
        "SqliteRunStore",
        "StepRunner",
        "StoredRun",
    },
    "tierstack.server.coordinate": {
        "AgentSpec",
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


def _loaded_after(statement: str) -> set[str]:
    """Returns the modules a fresh interpreter has loaded after running ``statement``."""
    shown = "import sys; " + statement + "; print('\\n'.join(sys.modules))"
    return set(subprocess.run([sys.executable, "-c", shown], check=True, capture_output=True, text=True).stdout.split())


def test_the_core_loads_without_grpc() -> None:
    loaded = _loaded_after(
        "import tierstack.core.errors, tierstack.core.values, tierstack.core.workflow, "
        "tierstack.core.lifecycle, tierstack.core.tracing"
    )
    assert "grpc" not in loaded
    assert not {name for name in loaded if name.startswith(("tierstack.server", "tierstack.client"))}


@pytest.mark.parametrize("tier", ["execute", "orchestrate", "coordinate"])
def test_a_tier_package_does_not_load_its_servicer(tier: str) -> None:
    loaded = _loaded_after(f"import tierstack.server.{tier}")
    servicers = {f"tierstack.server.{name}.service" for name in ("execute", "orchestrate", "coordinate")}
    assert not servicers & loaded


def test_the_sdk_raises_the_servers_error_classes() -> None:
    from tierstack import client
    from tierstack.core import errors

    for name in client.__all__:
        if name.endswith("Error"):
            assert getattr(client, name) is getattr(errors, name)
    assert not hasattr(client, "CancelledError")
