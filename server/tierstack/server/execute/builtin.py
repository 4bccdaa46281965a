"""The tools that ship with tierstack: text templates, JSON queries, HTTP requests and echo."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import ipaddress
import json
import os
import socket
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from functools import lru_cache
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Any

import httpcore
import httpx
import jinja2
import jmespath
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jmespath.exceptions import JMESPathError

from tierstack.core.errors import brief, quoted
from tierstack.core.values import JSON
from tierstack.server.ai import CompletionRequest, Message, ModelError, ModelProvider, Scope
from tierstack.server.auth.principal import namespaced
from tierstack.server.boundary import MAX_TEAM
from tierstack.server.breaker import Breakers
from tierstack.server.execute.registry import Tool, ToolContext, ToolError, ToolRegistry
from tierstack.server.execute.workers import output_limit, too_large

# Immutable: a template cannot change the values it is given (no ``x.pop()``, no ``d.update()``).
_JINJA = ImmutableSandboxedEnvironment(autoescape=False, undefined=jinja2.StrictUndefined)
# Only plain helpers: ``lipsum``, ``cycler`` and ``joiner`` render as the server's objects (addresses).
for _unsafe in ("lipsum", "cycler", "joiner"):
    del _JINJA.globals[_unsafe]
#: The most bytes and files one run's workspace may hold.
WORKSPACE_MAX_BYTES = 256 << 20
WORKSPACE_MAX_FILES = 10_000


# The templates and expressions below run in worker processes (see workers.py), so these caches of
# compiled ones live in each worker.
@lru_cache(maxsize=256)
def _template(source: str) -> jinja2.Template:
    return _JINJA.from_string(source)


@lru_cache(maxsize=256)
def _expression(source: str) -> Any:
    return jmespath.compile(source)


async def _echo(arguments: dict[str, Any], context: ToolContext) -> JSON:
    value: JSON = arguments.get("value")
    return value


async def _sleep(arguments: dict[str, Any], context: ToolContext) -> JSON:
    seconds: float = arguments["seconds"]
    await asyncio.sleep(seconds)
    return seconds


def _render(arguments: dict[str, Any], context: ToolContext) -> JSON:
    """Renders a template in a worker, piece by piece, stopping once the text passes the output cap."""
    limit = output_limit()
    parts = []
    size = 0
    try:
        for part in _template(arguments["template"]).generate(**arguments.get("variables", {})):
            size += len(part)
            if size > limit:
                raise too_large(limit)
            parts.append(part)
    except SecurityError as exc:
        raise ToolError("TEMPLATE_UNSAFE", f"the sandbox refused the template: {brief(str(exc))}") from exc
    except jinja2.TemplateError as exc:
        raise ToolError("TEMPLATE_ERROR", f"the template is not valid: {brief(str(exc))}") from exc
    return "".join(parts)


def _query(arguments: dict[str, Any], context: ToolContext) -> JSON:
    try:
        result: JSON = _expression(arguments["expression"]).search(arguments.get("data"))
    except JMESPathError as exc:
        raise ToolError("INVALID_EXPRESSION", f"the expression is not valid: {brief(str(exc))}") from exc
    return result


#: IPv6 forms no public host answers on: IPv4-compatible, IPv4-translated, local-use NAT64 (whose
#: IPv4 address is not in the last 32 bits) and Teredo tunnels.
_NEVER_PUBLIC = tuple(
    ipaddress.ip_network(n) for n in ("::/96", "::ffff:0:0:0/96", "64:ff9b:1::/48", "2001::/32", "192.0.0.0/24")
)
#: NAT64's well-known prefix, which carries an IPv4 address in its last 32 bits.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Says whether ``address`` is a unicast address on the public internet, and so is any IPv4
    address it carries (IPv4-mapped, 6to4, NAT64)."""
    if any(address.version == network.version and address in network for network in _NEVER_PUBLIC):
        return False
    if isinstance(address, ipaddress.IPv6Address):
        carried = [address.ipv4_mapped, address.sixtofour]
        if address in _NAT64:
            carried.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if address.is_site_local or any(inner is not None and not _public(inner) for inner in carried):
            return False
    return address.is_global and not address.is_multicast


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """Opens each connection to the address its host resolves to here, once ``check`` let it through."""

    def __init__(self, check: Callable[[str, int, float | None], Awaitable[str]]) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._check = check

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        address = await self._check(host, port, timeout)
        return await self._inner.connect_tcp(
            address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise ToolError("INVALID_URL", "calls reach hosts over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class HttpRequester:
    """The ``http.request`` tool: one shared connection pool, a host allow-list, an address check, a
    size limit.

    Each connection is opened to an address its host resolves to at that moment, once that address
    is checked, so a name that resolves elsewhere a moment later cannot lead the call to a refused
    address; the name stays the connection's (``Host``, TLS and its certificate check).

    Args:
        allowed_hosts: fnmatch patterns of the hosts calls may reach (``*`` allows every host).
        allowed_networks: Networks beyond the public internet calls may reach; every other loopback,
            private, link-local or reserved address is refused.
        tier_ports: Ports refused on every address: the tiers' own (see also :meth:`refuse_ports`).
        max_bytes: The default cap on a response body.
        breakers: A circuit breaker per tenant and host: a host that failed (no answer, or a 5xx
            status) 5 times within a minute gets no call from that tenant until a probe works.
    """

    def __init__(
        self,
        allowed_hosts: Sequence[str],
        *,
        allowed_networks: Sequence[str] = (),
        tier_ports: Collection[int] = (),
        max_bytes: int = 1 << 20,
        breakers: Breakers | None = None,
    ) -> None:
        self.breakers = breakers if breakers is not None else Breakers()
        self._allowed = tuple(allowed_hosts)
        self._networks = tuple(ipaddress.ip_network(network, strict=False) for network in allowed_networks)
        self._tier_ports = set(tier_ports)
        self._max_bytes = max_bytes
        transport = httpx.AsyncHTTPTransport(trust_env=False)
        # httpx takes no network backend of its own: its pool is replaced by one that checks addresses,
        # with httpx's own limits (httpcore's would hold 10 connections and keep idle ones forever).
        transport._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=_CheckedBackend(self._address),
        )
        # Redirects are not followed: a redirect could lead off the allow-list. No cookie is kept: the
        # client serves every tenant, so a cookie one call was given would go with another's.
        self._client = httpx.AsyncClient(
            transport=transport,
            follow_redirects=False,
            trust_env=False,
            cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
        )

    def refuse_ports(self, ports: Collection[int]) -> None:
        """Refuses ``ports`` too, on every address (the ones this server listens on, once bound)."""
        self._tier_ports.update(ports)

    async def aclose(self) -> None:
        """Closes the connection pool."""
        await self._client.aclose()

    def _check_host(self, url: str) -> None:
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            parsed = httpx.URL()
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ToolError("INVALID_URL", f"{quoted(url)} is not an http(s) URL")
        if not any(fnmatch.fnmatch(parsed.host, pattern) for pattern in self._allowed):
            raise ToolError(
                "HOST_NOT_ALLOWED",
                f"host {quoted(parsed.host)} is not in the allow-list (TIERSTACK_HTTP_ALLOWED_HOSTS)",
            )

    def _refusal(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str | None:
        """Says why a connection to ``address`` and ``port`` is refused; None if it is not."""
        if port in self._tier_ports:
            return f"port {port} is a tier's own"
        if not _public(address) and not any(address in network for network in self._networks):
            return "a loopback, private or reserved address, reached only in TIERSTACK_HTTP_ALLOWED_NETWORKS"
        return None

    async def _address(self, host: str, port: int, timeout: float | None) -> str:
        """Returns the first address ``host`` resolves to that a connection may be opened to."""
        try:
            async with asyncio.timeout(timeout):
                found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except TimeoutError:
            raise ToolError("HTTP_TIMEOUT", f"host {quoted(host)} did not resolve in time") from None
        except (OSError, UnicodeError):
            raise ToolError("HOST_NOT_FOUND", f"host {quoted(host)} does not resolve") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in found]
        refusals = [self._refusal(address, port) for address in addresses]
        if None in refusals:
            return str(addresses[refusals.index(None)])
        raise ToolError("ADDRESS_NOT_ALLOWED", f"host {quoted(host)} is refused: {refusals[0]}")

    async def __call__(self, arguments: dict[str, Any], context: ToolContext) -> JSON:
        url = arguments["url"]
        self._check_host(url)
        max_bytes = arguments.get("max_bytes", self._max_bytes)
        try:
            headers = httpx.Headers(arguments.get("headers"))
            headers.pop("host", None)  # the URL names the host: another on its address is not on the allow-list
            request = self._client.build_request(
                arguments.get("method", "GET"),
                url,
                headers=headers,
                content=arguments.get("body"),
                json=arguments.get("json"),
                timeout=arguments.get("timeout_seconds", 10.0),
            )
        except (UnicodeError, ValueError, TypeError) as exc:
            raise ToolError("INVALID_REQUEST", f"the request cannot be sent: {brief(str(exc))}") from None
        # Each tenant's own breaker: another's failing calls to a host must not stop this one's.
        breaker = self.breakers.of(namespaced(context.tenant, request.url.netloc.decode()))
        if not breaker.allow():
            raise ToolError(
                "CIRCUIT_OPEN", f"host {quoted(request.url.host)} kept failing; calls to it wait for a probe to work"
            )
        try:
            response = await self._client.send(request, stream=True)
            try:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        raise ToolError("RESPONSE_TOO_LARGE", f"the response exceeds {max_bytes} bytes")
            finally:
                await response.aclose()
        except httpx.TimeoutException as exc:
            breaker.failed()
            raise ToolError("HTTP_TIMEOUT", f"{request.method} {quoted(url)} timed out") from exc
        except httpx.HTTPError as exc:
            breaker.failed()
            raise ToolError("HTTP_ERROR", f"{request.method} {quoted(url)} failed: {brief(str(exc))}") from exc
        except ToolError as exc:  # refused here: the host answered (too much) or was never reached
            if exc.reason == "RESPONSE_TOO_LARGE":
                breaker.succeeded()
            raise
        if response.status_code >= 500:
            breaker.failed()
        else:
            breaker.succeeded()
        text = body.decode(response.encoding or "utf-8", errors="replace")
        result: dict[str, JSON] = {
            "status": response.status_code,
            "headers": dict(response.headers),
            "body": text,
        }
        if response.headers.get("content-type", "").startswith("application/json"):
            with contextlib.suppress(ValueError):  # a malformed body is still there as text
                result["json"] = json.loads(text)
        return result


def _inside(workspace: Path, path: str) -> Path:
    """Returns ``path`` within ``workspace``; runs in a worker thread (resolving touches the disk)."""
    root = workspace.resolve()
    target = (root / path).resolve()  # symlinks resolved too, so none leads out
    if not target.is_relative_to(root) or target == root:
        raise ToolError("PATH_OUTSIDE_WORKSPACE", f"{quoted(path)} is not a file inside the run's workspace")
    return target


def _usage(root: Path) -> tuple[int, int]:
    """Returns the bytes and the files a workspace holds (links not followed)."""
    size = files = 0
    for folder, _, names in os.walk(root):
        for name in names:
            files += 1
            with contextlib.suppress(OSError):
                size += os.lstat(os.path.join(folder, name)).st_size
    return size, files


def _write_file(workspace: Path, path: str, content: str, append: bool) -> int:
    try:
        target = _inside(workspace, path)
        size, files = _usage(workspace) if workspace.exists() else (0, 0)
        added = len(content.encode())
        if size + added > WORKSPACE_MAX_BYTES or (files >= WORKSPACE_MAX_FILES and not target.exists()):
            raise ToolError(
                "WORKSPACE_FULL",
                f"the run's workspace may hold {WORKSPACE_MAX_BYTES} bytes in {WORKSPACE_MAX_FILES} files; it holds"
                f" {size} bytes in {files} files",
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("a" if append else "w", encoding="utf-8") as file:
            return file.write(content)
    except (OSError, ValueError) as exc:
        raise _file_error(path, exc) from None


def _read_file(workspace: Path, path: str, limit: int) -> str:
    try:
        target = _inside(workspace, path)
        size = target.stat().st_size
        if size > limit:
            raise ToolError("FILE_TOO_LARGE", f"{quoted(path)} has {size} bytes; max_bytes is {limit}")
        return target.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ToolError("FILE_NOT_FOUND", f"{quoted(path)} does not exist in the run's workspace") from None
    except (OSError, ValueError) as exc:
        raise _file_error(path, exc) from None


def _file_error(path: str, error: OSError | ValueError) -> ToolError:
    """Returns the failure of a file the system refused, saying why without its place on the server."""
    why = error.strerror if isinstance(error, OSError) and error.strerror else "the path is not a file name"
    return ToolError("FILE_ERROR", f"{quoted(path)} cannot be used: {why}")


async def _files_write(arguments: dict[str, Any], context: ToolContext) -> JSON:
    path = arguments["path"]
    written = await asyncio.to_thread(
        _write_file, context.workspace, path, arguments["content"], arguments.get("append", False)
    )
    return {"path": path, "characters": written}


async def _files_read(arguments: dict[str, Any], context: ToolContext) -> JSON:
    return await asyncio.to_thread(
        _read_file, context.workspace, arguments["path"], arguments.get("max_bytes", 1 << 20)
    )


class ModelCompleter:
    """The ``ai.complete`` tool: one prompt to the configured model, its tokens counted."""

    def __init__(self, model: ModelProvider) -> None:
        self._model = model

    async def __call__(self, arguments: dict[str, Any], context: ToolContext) -> JSON:
        named = arguments.get("context", {}).items()
        prompt = arguments["prompt"] + "".join(f"\n\n[{name}]\n{text}" for name, text in named)
        messages = [Message("user", prompt)]
        if "system" in arguments:
            messages.insert(0, Message("system", arguments["system"]))
        request = CompletionRequest(
            messages=tuple(messages),
            model=arguments.get("model", ""),
            max_tokens=arguments.get("max_tokens"),
            scope=Scope(tenant=context.tenant, run=context.workspace_key, token_budget=context.tokens_left),
        )
        try:
            completion = await self._model.complete(request)
        except ModelError as exc:
            raise ToolError(exc.reason, exc.message) from exc
        context.meter.tokens += completion.spent
        return {
            "text": completion.content,
            "model": completion.model,
            "tokens": completion.spent,
            "cost": completion.cost,
        }


def register_builtin_tools(registry: ToolRegistry, http: HttpRequester, model: ModelProvider) -> None:
    """Adds the built-in tools to ``registry``."""
    registry.register(
        Tool(
            name="core.echo",
            description="Returns its `value` argument unchanged.",
            parameters={"type": "object", "properties": {"value": {}}, "additionalProperties": False},
            handler=_echo,
        )
    )
    registry.register(
        Tool(
            name="core.sleep",
            description="Waits `seconds` (at most 3600) and returns them.",
            parameters={
                "type": "object",
                "properties": {"seconds": {"type": "number", "minimum": 0, "maximum": 3600}},
                "required": ["seconds"],
                "additionalProperties": False,
            },
            handler=_sleep,
            timeout_seconds=3700.0,
        )
    )
    registry.register(
        Tool(
            name="ai.complete",
            description=(
                "Asks the configured model to complete a `prompt` (with an optional `system` message), followed"
                " by each named `context` text under its name in brackets."
            ),
            parameters={
                "type": "object",
                "properties": {
                    "prompt": {"type": "string", "minLength": 1},
                    "system": {"type": "string"},
                    "context": {
                        "type": "object",
                        "additionalProperties": {"type": "string"},
                        "propertyNames": {"maxLength": 128},
                        "maxProperties": MAX_TEAM,
                    },
                    "model": {"type": "string"},
                    "max_tokens": {"type": "integer", "minimum": 1},
                },
                "required": ["prompt"],
                "additionalProperties": False,
            },
            handler=ModelCompleter(model),
            timeout_seconds=300.0,
        )
    )
    registry.register(
        Tool(
            name="files.write",
            description="Writes `content` to `path` inside the run's workspace (appends with `append`).",
            parameters={
                "type": "object",
                "properties": {
                    "path": {"type": "string", "minLength": 1, "maxLength": 1024},
                    "content": {"type": "string"},
                    "append": {"type": "boolean"},
                },
                "required": ["path", "content"],
                "additionalProperties": False,
            },
            handler=_files_write,
        )
    )
    registry.register(
        Tool(
            name="files.read",
            description="Reads the text file at `path` inside the run's workspace.",
            parameters={
                "type": "object",
                "properties": {
                    "path": {"type": "string", "minLength": 1, "maxLength": 1024},
                    "max_bytes": {"type": "integer", "minimum": 1, "maximum": 64 << 20},
                },
                "required": ["path"],
                "additionalProperties": False,
            },
            handler=_files_read,
        )
    )
    registry.register(
        Tool(
            name="text.template",
            description="Renders a sandboxed Jinja2 `template` with `variables`.",
            parameters={
                "type": "object",
                "properties": {"template": {"type": "string"}, "variables": {"type": "object"}},
                "required": ["template"],
                "additionalProperties": False,
            },
            function=_render,
        )
    )
    registry.register(
        Tool(
            name="json.query",
            description="Queries or reshapes JSON `data` with a JMESPath `expression`.",
            parameters={
                "type": "object",
                "properties": {"data": {}, "expression": {"type": "string", "minLength": 1}},
                "required": ["expression"],
                "additionalProperties": False,
            },
            function=_query,
        )
    )
    registry.register(
        Tool(
            name="http.request",
            description="Sends an HTTP request to an allowed host and returns status, headers and body.",
            parameters={
                "type": "object",
                "properties": {
                    "url": {"type": "string", "minLength": 1},
                    "method": {"enum": ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]},
                    "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                    "body": {"type": "string"},
                    "json": {},
                    "timeout_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 300},
                    "max_bytes": {"type": "integer", "minimum": 1, "maximum": 64 << 20},
                },
                "required": ["url"],
                "additionalProperties": False,
            },
            handler=http,
            timeout_seconds=310.0,
        )
    )
