"""Authentication through the real servers: every RPC of every tier against no credential, a key
that is not one, and each role; keys made and revoked by the command line; the tiers' own calls."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from joserfc import jwt
from joserfc.jwk import RSAKey

from tests.helpers import TIERSTACK, HttpServer, Stack, grpcurl, open_stack, reply
from tierstack.client import (
    CoordinatorClient,
    NotFoundError,
    OrchestratorClient,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from tierstack.server import Settings
from tierstack.server.auth import Role, SqliteKeyStore, issue
from tierstack.server.auth.guard import REQUIRED
from tierstack.server.auth.keys import parse
from tierstack.v1 import (
    coordinator_service_pb2,
    executor_service_pb2,
    monitor_service_pb2,
    orchestrator_service_pb2,
)
from tierstack.v1 import coordinator_service_pb2 as pb

GOAL = "analyze the logs and count the errors, then write a summary"
AGENTS = [
    pb.Agent(id=name, capabilities=[capability, "general"], max_concurrent_tasks=4)
    for name, capability in (("researcher", "http"), ("analyst", "analysis"), ("writer", "writing"))
]
SERVICES = {
    "execute": executor_service_pb2.DESCRIPTOR.services_by_name["ExecutorService"],
    "orchestrate": orchestrator_service_pb2.DESCRIPTOR.services_by_name["OrchestratorService"],
    "coordinate": coordinator_service_pb2.DESCRIPTOR.services_by_name["CoordinatorService"],
}
MONITOR = monitor_service_pb2.DESCRIPTOR.services_by_name["MonitorService"]
REFUSED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


@dataclass
class Secured:
    stack: Stack
    data_dir: Path
    tokens: dict[str, str]  # by role name, each of tenant acme


async def keys(data_dir: Path) -> dict[str, str]:
    """Makes a tier key (tenant system) and a key of each role for tenant acme in the stack's store."""
    store = SqliteKeyStore.in_folder(data_dir)
    await store.open()
    tokens = {}
    try:
        for role in Role:
            issued = issue("system" if role is Role.TIER else "acme", role, role.name.lower())
            await store.add(issued)
            tokens[role.name.lower()] = issued.token
    finally:
        await store.close()
    return tokens


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Secured]:
    tokens = await keys(tmp_path)
    settings = Settings(data_dir=tmp_path, auth=True, tier_key=tokens["tier"], auth_cache_seconds=0)
    async with open_stack(settings) as stack:
        yield Secured(stack, tmp_path, tokens)


def secret(token: str) -> str:
    """The secret part of a key (which may hold underscores itself)."""
    parsed = parse(token)
    assert parsed is not None
    return parsed[1]


async def answer(channel: grpc.aio.Channel, method: str, streaming: bool, token: str | None) -> grpc.StatusCode:
    """Calls ``method`` with an empty request and returns the status it ends with (OK for a stream
    that sends a first message)."""
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    try:
        if streaming:
            streamed: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(method)
            call = streamed(b"", metadata=metadata, timeout=5)
            async for _ in call:
                break
            call.cancel()
        else:
            unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
            await unary(b"", metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_every_rpc_answers_each_credential_by_the_role_it_needs(secured: Secured) -> None:
    stack = secured.stack
    servers = {"execute": stack.execute, "orchestrate": stack.orchestrate, "coordinate": stack.coordinate}
    credentials = {
        "none": None,
        "not a key": "tsk_0000000000000000_" + "A" * 43,
        **{role: secured.tokens[role] for role in ("read", "run", "admin")},
    }
    wrong: list[str] = []
    for tier, server in servers.items():
        async with grpc.aio.insecure_channel(server.target) as channel:
            for service in (SERVICES[tier], MONITOR):
                for method in service.methods:
                    path = f"/{service.full_name}/{method.name}"
                    needed = REQUIRED[path]
                    for name, token in credentials.items():
                        code = await answer(channel, path, method.server_streaming, token)
                        if name in ("none", "not a key"):
                            expected_refusal: grpc.StatusCode | None = grpc.StatusCode.UNAUTHENTICATED
                        else:
                            expected_refusal = (
                                grpc.StatusCode.PERMISSION_DENIED if Role[name.upper()] < needed else None
                            )
                        if expected_refusal is not None and code != expected_refusal:
                            wrong.append(f"{tier} {method.name} with {name}: {code.name}, not {expected_refusal.name}")
                        if expected_refusal is None and code in REFUSED:
                            wrong.append(f"{tier} {method.name} with {name}: refused {code.name}")
            # Health stays open to probes.
            health = health_pb2_grpc.HealthStub(channel)
            response = await health.Check(health_pb2.HealthCheckRequest())
            assert response.status == health_pb2.HealthCheckResponse.SERVING
    assert not wrong, "\n".join(wrong)


async def test_a_goal_crosses_the_tiers_on_their_own_key_for_its_caller(secured: Secured) -> None:
    target = secured.stack.coordinate.target
    async with CoordinatorClient(target, api_key=secured.tokens["run"]) as client:
        events = [event async for event in client.coordinate(pb.CoordinateRequest(goal=GOAL, agents=AGENTS))]
    assert events[-1].WhichOneof("payload") == "goal_completed", events[-1]


async def test_a_refused_credential_is_not_echoed(secured: Secured) -> None:
    token = "tsk_0123456789abcdef_" + "B" * 43
    async with OrchestratorClient(secured.stack.orchestrate.target, api_key=token) as client:
        with pytest.raises(UnauthenticatedError) as refused:
            await client.list_runs()
    assert "B" * 8 not in str(refused.value) and "0123456789abcdef" not in str(refused.value)


async def test_reflection_needs_a_key_unless_opened(secured: Secured) -> None:
    target = secured.stack.execute.target
    with pytest.raises(AssertionError, match="Unauthenticated"):
        await asyncio.to_thread(grpcurl, target, "list")
    header = ["-plaintext", "-H", f"authorization: Bearer {secured.tokens['read']}"]
    listed = await asyncio.to_thread(grpcurl, target, "list", security=header)
    assert "tierstack.v1.ExecutorService" in listed.split()


async def test_keys_made_and_revoked_by_the_command_line(secured: Secured) -> None:
    env = {**os.environ, "COLUMNS": "200"}
    store = ["--store", f"sqlite:///{secured.data_dir}"]

    async def cli(*args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            *TIERSTACK, "keys", *args, *store, stdout=asyncio.subprocess.PIPE, env=env
        )
        output, _ = await process.communicate()
        assert process.returncode == 0, output.decode()
        return output.decode()

    token = (await cli("create", "--tenant", "beta", "--role", "read", "--name", "dashboard")).strip()
    key_id = token.split("_")[1]
    listed = await cli("list")
    assert key_id in listed and "beta" in listed and secret(token) not in listed
    async with OrchestratorClient(secured.stack.orchestrate.target, api_key=token) as client:
        await client.list_runs()
        await cli("revoke", key_id)
        with pytest.raises(UnauthenticatedError):
            await client.list_runs()


class IdentityProvider:
    """Signs tokens with RSA keys and serves their JWKS from a real HTTP server."""

    ISSUER = "https://id.example.com"
    AUDIENCE = "tierstack"

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.url = f"{server.url}/jwks.json"
        self.keys: list[RSAKey] = []
        self.rotate()

    def rotate(self) -> None:
        """Signs with a new key from now on, and serves it beside the old ones."""
        self.keys.append(RSAKey.generate_key(2048, parameters={"kid": f"k{len(self.keys)}"}))
        jwks = {"keys": [key.as_dict(private=False) for key in self.keys]}
        self.server.routes["/jwks.json"] = reply(json.dumps(jwks).encode())

    def token(self, *, key: RSAKey | None = None, **claims: object) -> str:
        signer = key or self.keys[-1]
        payload = {
            "iss": self.ISSUER,
            "aud": self.AUDIENCE,
            "sub": "alice",
            "tenant": "acme",
            "role": "read",
            "exp": int(time.time()) + 600,
            **claims,
        }
        return jwt.encode({"alg": "RS256", "kid": signer.kid}, payload, signer)


async def test_tokens_signed_by_the_providers_jwks_are_credentials(tmp_path: Path, http_server: HttpServer) -> None:
    provider = IdentityProvider(http_server)
    tokens = await keys(tmp_path)
    settings = Settings(
        data_dir=tmp_path,
        auth=True,
        tier_key=tokens["tier"],
        jwks_url=provider.url,
        jwt_issuer=provider.ISSUER,
        jwt_audience=provider.AUDIENCE,
        jwks_refresh_seconds=0,
    )
    async with open_stack(settings) as stack:
        target = stack.orchestrate.target

        async def list_runs(token: str) -> None:
            async with OrchestratorClient(target, api_key=token) as client:
                await client.list_runs()

        await list_runs(provider.token())
        with pytest.raises(PermissionDeniedError):  # a read token may not start work
            async with OrchestratorClient(target, api_key=provider.token()) as client:
                await client.cancel_run("r1")
        stranger = RSAKey.generate_key(2048, parameters={"kid": "k0"})
        refused = {
            "expired": provider.token(exp=int(time.time()) - 5),
            "another audience": provider.token(aud="another"),
            "another issuer": provider.token(iss="https://evil.example.com"),
            "a key the provider does not serve": provider.token(key=stranger),
            "no tenant": provider.token(tenant=""),
            "the tier role": provider.token(role="tier"),
            "garbage": "x.y.z",
        }
        for why, token in refused.items():
            with pytest.raises(UnauthenticatedError):
                await list_runs(token)
            assert why
        provider.rotate()  # a token of the new key makes the server read the JWKS again
        await list_runs(provider.token())
        assert http_server.hits.count("/jwks.json") >= 2


async def test_state_changing_calls_are_audited_without_credentials(
    secured: Secured, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    run_key = secured.tokens["run"]
    async with CoordinatorClient(secured.stack.coordinate.target, api_key=run_key) as client:
        with pytest.raises(NotFoundError):
            await client.cancel_goal("g-1\nforged line")
        await client.list_goals(pb.ListGoalsRequest())  # a read: not audited
    async with CoordinatorClient(secured.stack.coordinate.target) as anonymous:
        with pytest.raises(UnauthenticatedError):
            await anonymous.cancel_goal("g-2")
    async with CoordinatorClient(secured.stack.coordinate.target, api_key=secured.tokens["read"]) as reader:
        with pytest.raises(PermissionDeniedError):
            await reader.cancel_goal("g-3")
    audited = [record for record in caplog.records if record.name == "tierstack.audit"]
    assert [(r.tenant, r.caller, r.method.rpartition("/")[2], r.resource, r.code) for r in audited] == [  # type: ignore[attr-defined]
        ("acme", run_key.split("_")[1], "CancelGoal", "g-1?forged?line", "NOT_FOUND"),
        ("-", "-", "CancelGoal", "-", "UNAUTHENTICATED"),  # refused before its request is read
        ("acme", secured.tokens["read"].split("_")[1], "CancelGoal", "g-3", "PERMISSION_DENIED"),
    ]
    logged = caplog.text
    assert all(secret(token) not in logged for token in secured.tokens.values())


async def test_a_tenant_over_its_calls_a_second_is_told_when_to_try_again(tmp_path: Path) -> None:
    tokens = await keys(tmp_path)
    store = SqliteKeyStore.in_folder(tmp_path)
    await store.open()
    other = issue("beta", Role.READ)
    await store.add(other)
    await store.close()
    settings = Settings(data_dir=tmp_path, auth=True, tier_key=tokens["tier"], tenant_requests_per_second=0.2)
    async with open_stack(settings) as stack:
        target = stack.orchestrate.target
        async with (
            OrchestratorClient(target, api_key=tokens["read"]) as acme,
            OrchestratorClient(target, api_key=other.token) as beta,
        ):
            await acme.list_runs()  # a call every 5 s, in bursts of one
            with pytest.raises(ResourceExhaustedError) as limited:
                await acme.list_runs()
            assert limited.value.reason == "RATE_LIMITED"
            assert limited.value.retry_after is not None and 0 < limited.value.retry_after <= 5
            assert [v.field for v in limited.value.violations] == ["requests_per_second"]
            await beta.list_runs()  # another tenant's calls are its own
