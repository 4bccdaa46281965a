"""Server settings: embedded defaults, overridable by environment variables and CLI flags."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tierstack.client.defaults import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_METRICS_PORTS,
    DEFAULT_PORTS,
    TIERS,
    default_target,
)
from tierstack.client.tls import Tls
from tierstack.server.crosstier import Thresholds
from tierstack.server.tls import ServerTls, is_loopback

__all__ = ["DEFAULT_PORTS", "TIERS", "Settings"]

_STORE_SCHEMES = ("sqlite:///", "postgresql://", "postgres://")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a tierstack server needs to start.

    Attributes:
        host: The address to bind; an address other than loopback needs ``tls`` or ``insecure``.
        tls: The server's certificate, mutual TLS for its callers, and the TLS of its calls to the
            tiers below (``TIERSTACK_TLS_*``); None serves and calls in plaintext.
        insecure: Lets a server listen in plaintext on an address other than loopback
            (``TIERSTACK_INSECURE=1``, ``--insecure``).
        auth: Every call but health checks needs a credential (an API key of the store, or a JSON Web
            Token when ``jwks_url`` is set) with the role its RPC needs (``TIERSTACK_AUTH=on``); off
            by default.
        jwks_url: Where the identity provider serves the JWKS that signs JSON Web Tokens
            (``TIERSTACK_JWKS_URL``); empty accepts API keys alone.
        jwt_issuer: The ``iss`` of every token (``TIERSTACK_JWT_ISSUER``), needed with ``jwks_url``.
        jwt_audience: The ``aud`` of every token (``TIERSTACK_JWT_AUDIENCE``), needed with ``jwks_url``.
        jwks_refresh_seconds: How often at most the JWKS is read again when a token does not verify
            against it (the provider may have rotated its keys).
        tier_key: The API key (of the TIER role) this server presents to the tiers below when auth is
            on (``TIERSTACK_TIER_KEY``); it names the tenant and caller each call is for.
        open_reflection: Lets anyone use reflection (grpcurl) when auth is on
            (``TIERSTACK_REFLECTION=open``); else reflection needs a key.
        auth_cache_seconds: How long a server trusts a key it read from the store; a revoked key stops
            working within this.
        tenant_requests_per_second: How many calls a second each tenant may make to this server when
            auth is on (``TIERSTACK_TENANT_REQUESTS_PER_SECOND``); 0 for no limit.
        tenant_concurrent_runs: How many unfinished runs (paused ones too) each tenant may have in
            Orchestrate's store when auth is on (``TIERSTACK_TENANT_CONCURRENT_RUNS``); 0 for no limit.
        tenant_concurrent_goals: How many unfinished goals each tenant may have in Coordinate's store
            (``TIERSTACK_TENANT_CONCURRENT_GOALS``); 0 for no limit.
        max_concurrent_streams: How many calls one connection may have open at once.
        port: The port to bind; 0 picks a free one.
        metrics_port: The port of the Prometheus endpoint (``/metrics``); 0 picks a free one, None serves
            none.
        execute_target: Where Orchestrate reaches Execute.
        orchestrate_target: Where Coordinate reaches Orchestrate.
        data_dir: Where the tiers keep their files: workspaces, the goal memory, and the SQLite stores
            unless ``store_url`` names another place.
        store_url: Where runs, goals and Execute's executions are stored (``TIERSTACK_STORE_URL``):
            ``sqlite:///<folder>`` for SQLite files in that folder (``sqlite:////`` for an absolute
            one), or ``postgresql://…`` for one PostgreSQL database that any number of replicas
            share; empty is SQLite in ``data_dir``.
        lease_seconds: How long a replica holds a run or a goal without renewing its lease; another
            replica takes over the runs and goals of one that has not renewed for this long.
        replica_id: Names this replica as the owner of what it drives (``TIERSTACK_REPLICA_ID``), so
            that, restarted under the same name, it resumes its own runs at once instead of after
            their leases; unique among the replicas that run at once. A new random name by default.
        http_allowed_hosts: Host patterns (fnmatch) the ``http.request`` tool may reach.
        http_allowed_networks: The networks (CIDR) beyond the public internet that ``http.request`` may
            reach: by default it refuses any loopback, private, link-local or otherwise non-public
            address a host resolves to. The tiers' own ports on such addresses stay refused.
        grace_seconds: How long in-flight calls may finish when the server stops.
        slow_tool_seconds: Tools whose average latency is above this are reported as slow.
        max_concurrent_tools: How many tool calls of ``ExecuteTools`` batches run at once per server.
        approval_timeout_seconds: How long a tool call waits for approval before it is rejected.
        model_base_url: The OpenAI-compatible API models are called through; empty uses the local model.
        model: The model asked when a call names none.
        model_api_key: The key of that API, if it wants one.
        model_fallbacks: Models tried in order when the model fails or its circuit is open (``local`` is
            the local model).
        model_timeout_seconds: How long one model call may take.
        model_retries: How often a transient model failure is retried before the next model is tried.
        model_cache_entries: How many model answers the in-memory cache keeps.
        model_cache_ttl_seconds: How long a cached model answer is kept.
        redis_url: ``redis://host:port/db`` of the second-level model cache; empty keeps memory alone.
        model_batch_size: The most embedding requests sent in one call.
        model_batch_window_seconds: How long an embedding request may wait for its call.
        model_prices: Credits per thousand prompt and completion tokens by model, as
            ``{"model": [prompt, completion]}`` JSON.
        tenant_token_budgets: The model tokens each tenant may spend, as ``{"tenant": tokens}`` JSON.
        mcp_servers: MCP servers whose tools Execute mounts, as ``{"prefix": {"command": [...]} | {"url": "..."}}``
            JSON (``TIERSTACK_MCP_SERVERS``).
        templates_dir: A folder of goal templates (YAML) Coordinate adds to its built-in ones.
        similarity_threshold: How similar (0..1) a past goal must be for its decomposition to be reused.
        monitor_interval_seconds: How often Coordinate evaluates alerts across the tiers.
        alert_thresholds: When alerts are raised (``TIERSTACK_ALERT_*``).
        advice_window_seconds: How far back Coordinate's recommendations look (and so the advice each
            alert carries): what the tiers did before is forgotten (``TIERSTACK_ADVICE_WINDOW_SECONDS``).
        embedding_model: Judge goal similarity by this model's embeddings (through the model API)
            instead of character n-grams.
        goal_memory_entries: How many learnt goals Coordinate keeps (those learnt longest ago are
            forgotten first).
        max_output_bytes: The largest output of one tool call or one step, in bytes of its wire form.
        max_message_bytes: The largest gRPC message this server receives or sends, and its calls to the
            tier below; the same on every tier (``TIERSTACK_MAX_MESSAGE_BYTES``, 16 MiB).
        max_run_output_bytes: The largest outputs of one run or one goal together (3 MiB by default,
            so that a client with gRPC's default 4 MiB limit reads every event; half the message
            size at most).
        execution_store_bytes: How many bytes of finished executions' events Execute keeps to replay
            a step asked for again; past it, those finished longest ago are forgotten.
        retention_seconds: How long a finished run (with its events) and an unused workspace are kept;
            0 keeps them forever.
        worker_processes: How many worker processes run the tool calls that burn CPU or memory
            (templates, JSON queries, sync Python tools) at once; the CPU count by default.
        worker_memory_mb: The address space each of those workers may use, in MiB.
    """

    host: str = "127.0.0.1"
    tls: ServerTls | None = None
    insecure: bool = False
    auth: bool = False
    jwks_url: str = ""
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwks_refresh_seconds: float = 30.0
    tier_key: str = field(default="", repr=False)
    open_reflection: bool = False
    auth_cache_seconds: float = 5.0
    tenant_requests_per_second: float = 0.0
    tenant_concurrent_runs: int = 0
    tenant_concurrent_goals: int = 0
    max_concurrent_streams: int = 1000
    port: int = 0
    metrics_port: int | None = None
    execute_target: str = default_target("execute")
    orchestrate_target: str = default_target("orchestrate")
    data_dir: Path = Path(".tierstack")
    store_url: str = field(default="", repr=False)  # it may carry a password
    lease_seconds: float = 10.0
    replica_id: str = ""
    http_allowed_hosts: tuple[str, ...] = ("*",)
    http_allowed_networks: tuple[str, ...] = ()
    grace_seconds: float = 5.0
    slow_tool_seconds: float = 1.0
    max_concurrent_tools: int = 64
    approval_timeout_seconds: float = 300.0
    model_base_url: str = ""
    model: str = "local"
    model_api_key: str = field(default="", repr=False)
    model_fallbacks: tuple[str, ...] = ()
    model_timeout_seconds: float = 60.0
    model_retries: int = 2
    model_cache_entries: int = 4096
    model_cache_ttl_seconds: float = 3600.0
    redis_url: str = field(default="", repr=False)
    model_batch_size: int = 10
    model_batch_window_seconds: float = 0.1
    model_prices: str = ""
    tenant_token_budgets: str = ""
    mcp_servers: str = ""
    templates_dir: Path | None = None
    similarity_threshold: float = 0.85
    embedding_model: str = ""
    goal_memory_entries: int = 10_000
    monitor_interval_seconds: float = 5.0
    alert_thresholds: Thresholds = field(default_factory=Thresholds)
    advice_window_seconds: float = 300.0
    max_output_bytes: int = 1 << 20
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_run_output_bytes: int = 3 << 20
    retention_seconds: float = 7 * 24 * 3600.0
    execution_store_bytes: int = 1 << 30
    worker_processes: int = field(default_factory=lambda: os.cpu_count() or 1)
    worker_memory_mb: int = 512

    def __post_init__(self) -> None:
        if self.store_url and not self.store_url.startswith(_STORE_SCHEMES):
            # The URL is not quoted: it may carry a password.
            raise ValueError(f"TIERSTACK_STORE_URL must start with one of {', '.join(_STORE_SCHEMES)}")
        if not 0.1 <= self.lease_seconds <= 3600:
            raise ValueError("TIERSTACK_LEASE_SECONDS must be between 0.1 and 3600")
        if len(self.replica_id) > 128:
            raise ValueError("TIERSTACK_REPLICA_ID may have at most 128 characters")
        if min(self.tenant_requests_per_second, self.tenant_concurrent_runs, self.tenant_concurrent_goals) < 0:
            raise ValueError("TIERSTACK_TENANT_* quotas are 0 (no limit) or more")
        if self.advice_window_seconds <= 0:
            raise ValueError("TIERSTACK_ADVICE_WINDOW_SECONDS must be above 0")
        if self.max_concurrent_streams < 1:
            raise ValueError("TIERSTACK_MAX_CONCURRENT_STREAMS is 1 or more")
        for network in self.http_allowed_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"TIERSTACK_HTTP_ALLOWED_NETWORKS: {network[:64]!r} is not a network") from None
        if self.jwks_url and not (self.jwt_issuer and self.jwt_audience):
            raise ValueError("TIERSTACK_JWKS_URL needs TIERSTACK_JWT_ISSUER and TIERSTACK_JWT_AUDIENCE")
        if self.tls is None and not self.insecure and not is_loopback(self.host):
            raise ValueError(
                f"a server on {self.host[:64]} needs TLS (TIERSTACK_TLS_CERT and TIERSTACK_TLS_KEY), or "
                "--insecure to serve anyone who reaches it in plaintext"
            )
        for name, target in (("EXECUTE", self.execute_target), ("ORCHESTRATE", self.orchestrate_target)):
            if self.tls is None and not self.insecure and not all(map(is_loopback, target_hosts(target))):
                raise ValueError(
                    f"TIERSTACK_{name}_TARGET is another machine: calls to it need TLS (TIERSTACK_TLS_*), or "
                    "--insecure to send them, and any key, in plaintext"
                )

    @property
    def tls_below(self) -> Tls | None:
        """The TLS of this server's calls to the tiers below; None for plaintext."""
        return self.tls.below() if self.tls is not None else None

    @property
    def tier_ports(self) -> frozenset[int]:
        """The ports tiers listen on (the defaults and this server's targets'), which tools never reach;
        a server adds the ones it listens on once bound."""
        targets = (self.execute_target, self.orchestrate_target)
        ports = {*DEFAULT_PORTS.values(), *DEFAULT_METRICS_PORTS.values()}
        ports.update(int(port) for target in targets for port in target_ports(target))
        return frozenset(ports)

    @property
    def postgres_url(self) -> str | None:
        """The PostgreSQL database of the stores, or None for SQLite."""
        return self.store_url if self.store_url.startswith(("postgresql://", "postgres://")) else None

    @property
    def sqlite_dir(self) -> Path:
        """The folder of the SQLite stores (when ``postgres_url`` is None): as in SQLAlchemy's URLs,
        ``sqlite:///relative/folder`` or ``sqlite:////absolute/folder``."""
        if self.store_url.startswith("sqlite:///"):
            return Path(self.store_url.removeprefix("sqlite:///"))
        return self.data_dir

    @property
    def max_total_output_bytes(self) -> int:
        """The largest outputs of one run or one goal together, in bytes of their wire form:
        ``max_run_output_bytes``, and at most half the largest message, so that the event carrying
        them fits one message with room to spare."""
        return min(self.max_run_output_bytes, self.max_message_bytes // 2)

    @classmethod
    def from_env(cls, tier: str, env: Mapping[str, str] | None = None) -> Settings:
        """Reads ``TIERSTACK_*`` variables; a tier's port comes from ``TIERSTACK_<TIER>_PORT``."""
        env = os.environ if env is None else env
        defaults = cls()
        metrics_port = env.get(f"TIERSTACK_{tier.upper()}_METRICS_PORT", str(DEFAULT_METRICS_PORTS[tier]))
        return cls(
            host=env.get("TIERSTACK_HOST", defaults.host),
            tls=ServerTls.from_env(env),
            insecure=env.get("TIERSTACK_INSECURE", "").lower() in ("1", "true", "yes"),
            auth=_auth(env.get("TIERSTACK_AUTH", "off")),
            jwks_url=env.get("TIERSTACK_JWKS_URL", ""),
            jwt_issuer=env.get("TIERSTACK_JWT_ISSUER", ""),
            jwt_audience=env.get("TIERSTACK_JWT_AUDIENCE", ""),
            jwks_refresh_seconds=float(env.get("TIERSTACK_JWKS_REFRESH_SECONDS", defaults.jwks_refresh_seconds)),
            tier_key=env.get("TIERSTACK_TIER_KEY", defaults.tier_key),
            open_reflection=env.get("TIERSTACK_REFLECTION", "").lower() == "open",
            auth_cache_seconds=float(env.get("TIERSTACK_AUTH_CACHE_SECONDS", defaults.auth_cache_seconds)),
            tenant_requests_per_second=float(
                env.get("TIERSTACK_TENANT_REQUESTS_PER_SECOND", defaults.tenant_requests_per_second)
            ),
            tenant_concurrent_runs=int(env.get("TIERSTACK_TENANT_CONCURRENT_RUNS", defaults.tenant_concurrent_runs)),
            tenant_concurrent_goals=int(env.get("TIERSTACK_TENANT_CONCURRENT_GOALS", defaults.tenant_concurrent_goals)),
            max_concurrent_streams=int(env.get("TIERSTACK_MAX_CONCURRENT_STREAMS", defaults.max_concurrent_streams)),
            port=int(env.get(f"TIERSTACK_{tier.upper()}_PORT", DEFAULT_PORTS[tier])),
            metrics_port=None if metrics_port.lower() in ("", "off") else int(metrics_port),
            execute_target=env.get("TIERSTACK_EXECUTE_TARGET", defaults.execute_target),
            orchestrate_target=env.get("TIERSTACK_ORCHESTRATE_TARGET", defaults.orchestrate_target),
            data_dir=Path(env.get("TIERSTACK_DATA_DIR", str(defaults.data_dir))),
            store_url=env.get("TIERSTACK_STORE_URL", defaults.store_url),
            lease_seconds=float(env.get("TIERSTACK_LEASE_SECONDS", defaults.lease_seconds)),
            replica_id=env.get("TIERSTACK_REPLICA_ID", defaults.replica_id),
            http_allowed_hosts=_listed(env.get("TIERSTACK_HTTP_ALLOWED_HOSTS")) or defaults.http_allowed_hosts,
            http_allowed_networks=_listed(env.get("TIERSTACK_HTTP_ALLOWED_NETWORKS")),
            grace_seconds=float(env.get("TIERSTACK_GRACE_SECONDS", defaults.grace_seconds)),
            slow_tool_seconds=float(env.get("TIERSTACK_SLOW_TOOL_SECONDS", defaults.slow_tool_seconds)),
            max_concurrent_tools=int(env.get("TIERSTACK_MAX_CONCURRENT_TOOLS", defaults.max_concurrent_tools)),
            model_base_url=env.get("TIERSTACK_MODEL_BASE_URL", defaults.model_base_url),
            model=env.get("TIERSTACK_MODEL", defaults.model),
            model_api_key=env.get("TIERSTACK_MODEL_API_KEY", defaults.model_api_key),
            model_fallbacks=_listed(env.get("TIERSTACK_MODEL_FALLBACKS")),
            model_timeout_seconds=float(env.get("TIERSTACK_MODEL_TIMEOUT_SECONDS", defaults.model_timeout_seconds)),
            model_retries=int(env.get("TIERSTACK_MODEL_RETRIES", defaults.model_retries)),
            model_cache_entries=int(env.get("TIERSTACK_MODEL_CACHE_ENTRIES", defaults.model_cache_entries)),
            model_cache_ttl_seconds=float(
                env.get("TIERSTACK_MODEL_CACHE_TTL_SECONDS", defaults.model_cache_ttl_seconds)
            ),
            redis_url=env.get("TIERSTACK_REDIS_URL", defaults.redis_url),
            model_batch_size=int(env.get("TIERSTACK_MODEL_BATCH_SIZE", defaults.model_batch_size)),
            model_batch_window_seconds=float(
                env.get("TIERSTACK_MODEL_BATCH_WINDOW_SECONDS", defaults.model_batch_window_seconds)
            ),
            model_prices=env.get("TIERSTACK_MODEL_PRICES", defaults.model_prices),
            tenant_token_budgets=env.get("TIERSTACK_TENANT_TOKEN_BUDGETS", defaults.tenant_token_budgets),
            mcp_servers=env.get("TIERSTACK_MCP_SERVERS", defaults.mcp_servers),
            templates_dir=Path(env["TIERSTACK_TEMPLATES_DIR"]) if env.get("TIERSTACK_TEMPLATES_DIR") else None,
            similarity_threshold=float(env.get("TIERSTACK_SIMILARITY_THRESHOLD", defaults.similarity_threshold)),
            embedding_model=env.get("TIERSTACK_EMBEDDING_MODEL", defaults.embedding_model),
            goal_memory_entries=int(env.get("TIERSTACK_GOAL_MEMORY_ENTRIES", defaults.goal_memory_entries)),
            monitor_interval_seconds=float(
                env.get("TIERSTACK_MONITOR_INTERVAL_SECONDS", defaults.monitor_interval_seconds)
            ),
            alert_thresholds=Thresholds(
                **{
                    name: type(default)(env.get(f"TIERSTACK_ALERT_{name.upper()}", default))
                    for name, default in dataclasses.asdict(defaults.alert_thresholds).items()
                }
            ),
            advice_window_seconds=float(env.get("TIERSTACK_ADVICE_WINDOW_SECONDS", defaults.advice_window_seconds)),
            max_output_bytes=int(env.get("TIERSTACK_MAX_OUTPUT_BYTES", defaults.max_output_bytes)),
            max_message_bytes=int(env.get("TIERSTACK_MAX_MESSAGE_BYTES", defaults.max_message_bytes)),
            max_run_output_bytes=int(env.get("TIERSTACK_MAX_RUN_OUTPUT_BYTES", defaults.max_run_output_bytes)),
            retention_seconds=float(env.get("TIERSTACK_RETENTION_SECONDS", defaults.retention_seconds)),
            execution_store_bytes=int(env.get("TIERSTACK_EXECUTION_STORE_BYTES", defaults.execution_store_bytes)),
            worker_processes=int(env.get("TIERSTACK_WORKER_PROCESSES", defaults.worker_processes)),
            worker_memory_mb=int(env.get("TIERSTACK_WORKER_MEMORY_MB", defaults.worker_memory_mb)),
            approval_timeout_seconds=float(
                env.get("TIERSTACK_APPROVAL_TIMEOUT_SECONDS", defaults.approval_timeout_seconds)
            ),
        )


def target_hosts(target: str) -> list[str]:
    """Returns the hosts a channel target names (``host:port``, several, or a gRPC name)."""
    return [address.rpartition(":")[0] or address for address in _addresses(target)]


def target_ports(target: str) -> list[str]:
    """Returns the ports a channel target names, where it names them."""
    return [port for address in _addresses(target) if (port := address.rpartition(":")[2]).isdigit()]


def _addresses(target: str) -> list[str]:
    named = target.split(":///", 1)[-1].removeprefix("ipv4:").removeprefix("ipv6:")
    return named.split(",")


def _listed(value: str | None) -> tuple[str, ...]:
    """Reads a comma-separated setting."""
    return tuple(item.strip() for item in (value or "").split(",") if item.strip())


def _auth(value: str) -> bool:
    """Reads ``TIERSTACK_AUTH``: ``on`` turns authentication on, ``off`` (or empty) leaves it off."""
    if value.lower() not in ("", "off", "on"):
        raise ValueError("TIERSTACK_AUTH must be off or on")
    return value.lower() == "on"
