"""Server settings: embedded defaults, overridable by environment variables and CLI flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tierstack.client.defaults import DEFAULT_PORTS, TIERS, default_target

__all__ = ["DEFAULT_PORTS", "TIERS", "Settings"]


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a tierstack server needs to start.

    Attributes:
        host: The address to bind.
        port: The port to bind; 0 picks a free one.
        execute_target: Where Orchestrate reaches Execute.
        orchestrate_target: Where Coordinate reaches Orchestrate.
        data_dir: Where Orchestrate keeps its SQLite run store.
        http_allowed_hosts: Host patterns (fnmatch) the ``http.request`` tool may reach.
        grace_seconds: How long in-flight calls may finish when the server stops.
        slow_tool_seconds: Tools whose average latency is above this are reported as slow.
        max_concurrent_tools: How many tool calls of ``ExecuteTools`` batches run at once per server.
        approval_timeout_seconds: How long a tool call waits for approval before it is rejected.
        model_base_url: The OpenAI-compatible API models are called through; empty uses the local model.
        model: The model asked when a call names none.
        model_api_key: The key of that API, if it wants one.
        mcp_servers: MCP servers whose tools Execute mounts, as ``{"prefix": {"command": [...]} | {"url": "..."}}``
            JSON (``TIERSTACK_MCP_SERVERS``).
        templates_dir: A folder of goal templates (YAML) Coordinate adds to its built-in ones.
        similarity_threshold: How similar (0..1) a past goal must be for its decomposition to be reused.
    """

    host: str = "127.0.0.1"
    port: int = 0
    execute_target: str = default_target("execute")
    orchestrate_target: str = default_target("orchestrate")
    data_dir: Path = Path(".tierstack")
    http_allowed_hosts: tuple[str, ...] = field(default=("127.0.0.1", "localhost", "::1"))
    grace_seconds: float = 5.0
    slow_tool_seconds: float = 1.0
    max_concurrent_tools: int = 64
    approval_timeout_seconds: float = 300.0
    model_base_url: str = ""
    model: str = "local"
    model_api_key: str = ""
    mcp_servers: str = ""
    templates_dir: Path | None = None
    similarity_threshold: float = 0.85

    @classmethod
    def from_env(cls, tier: str, env: Mapping[str, str] | None = None) -> Settings:
        """Reads ``TIERSTACK_*`` variables; a tier's port comes from ``TIERSTACK_<TIER>_PORT``."""
        env = os.environ if env is None else env
        defaults = cls()
        hosts = env.get("TIERSTACK_HTTP_ALLOWED_HOSTS")
        return cls(
            host=env.get("TIERSTACK_HOST", defaults.host),
            port=int(env.get(f"TIERSTACK_{tier.upper()}_PORT", DEFAULT_PORTS[tier])),
            execute_target=env.get("TIERSTACK_EXECUTE_TARGET", defaults.execute_target),
            orchestrate_target=env.get("TIERSTACK_ORCHESTRATE_TARGET", defaults.orchestrate_target),
            data_dir=Path(env.get("TIERSTACK_DATA_DIR", str(defaults.data_dir))),
            http_allowed_hosts=(
                tuple(h.strip() for h in hosts.split(",") if h.strip()) if hosts else defaults.http_allowed_hosts
            ),
            grace_seconds=float(env.get("TIERSTACK_GRACE_SECONDS", defaults.grace_seconds)),
            slow_tool_seconds=float(env.get("TIERSTACK_SLOW_TOOL_SECONDS", defaults.slow_tool_seconds)),
            max_concurrent_tools=int(env.get("TIERSTACK_MAX_CONCURRENT_TOOLS", defaults.max_concurrent_tools)),
            model_base_url=env.get("TIERSTACK_MODEL_BASE_URL", defaults.model_base_url),
            model=env.get("TIERSTACK_MODEL", defaults.model),
            model_api_key=env.get("TIERSTACK_MODEL_API_KEY", defaults.model_api_key),
            mcp_servers=env.get("TIERSTACK_MCP_SERVERS", defaults.mcp_servers),
            templates_dir=Path(env["TIERSTACK_TEMPLATES_DIR"]) if env.get("TIERSTACK_TEMPLATES_DIR") else None,
            similarity_threshold=float(env.get("TIERSTACK_SIMILARITY_THRESHOLD", defaults.similarity_threshold)),
            approval_timeout_seconds=float(
                env.get("TIERSTACK_APPROVAL_TIMEOUT_SECONDS", defaults.approval_timeout_seconds)
            ),
        )
