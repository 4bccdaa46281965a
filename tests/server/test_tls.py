"""TLS and mutual TLS on every server and every hop between tiers, with certificates made here."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from tests.helpers import TIERSTACK, Stack, grpcurl, open_stack, spawned_stack, stop
from tierstack.client import CoordinatorClient, MonitorClient, Tls, UnavailableError
from tierstack.server import ServerTls, Settings
from tierstack.server.auth import Role, SqliteKeyStore, issue
from tierstack.v1 import common_pb2
from tierstack.v1 import coordinator_service_pb2 as pb

GOAL = "analyze the logs and count the errors, then write a summary"
AGENTS = [
    pb.Agent(id=name, capabilities=[capability, "general"], max_concurrent_tasks=4)
    for name, capability in (("researcher", "http"), ("analyst", "analysis"), ("writer", "writing"))
]
EVERY_TIER = [common_pb2.TIER_COORDINATE, common_pb2.TIER_ORCHESTRATE, common_pb2.TIER_EXECUTE]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def chain(cert: trustme.LeafCert) -> bytes:
    return b"".join(blob.bytes() for blob in cert.cert_chain_pems)


def server_tls(ca: trustme.CA, *, client_auth: bool = False) -> ServerTls:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    return ServerTls(
        certificate=chain(cert), key=cert.private_key_pem.bytes(), ca=ca.cert_pem.bytes(), client_auth=client_auth
    )


def caller_tls(ca: trustme.CA, *, trusted: trustme.CA | None = None) -> Tls:
    """A caller with a certificate of ``ca`` that trusts the servers of ``trusted`` (``ca`` by default)."""
    cert = ca.issue_cert("caller@example.com")
    return Tls(ca=(trusted or ca).cert_pem.bytes(), certificate=chain(cert), key=cert.private_key_pem.bytes())


async def pursue(client: CoordinatorClient) -> pb.GoalEvent:
    """Pursues :data:`GOAL` and returns its last event."""
    events = [event async for event in client.coordinate(pb.CoordinateRequest(goal=GOAL, agents=AGENTS))]
    return events[-1]


@pytest.fixture
async def tls_stack(ca: trustme.CA) -> AsyncIterator[Stack]:
    async with open_stack(Settings(tls=server_tls(ca)), client_tls=Tls(ca=ca.cert_pem.bytes())) as stack:
        yield stack


async def test_a_goal_crosses_every_tier_over_tls(tls_stack: Stack) -> None:
    last = await pursue(tls_stack.coordinator)
    assert last.WhichOneof("payload") == "goal_completed", last
    # Coordinate's monitor reads the tiers below over TLS too.
    metrics = await MonitorClient(channel=tls_stack.coordinator.channel).get_metrics(tiers=EVERY_TIER)
    assert [tier.tier for tier in metrics.tiers] == EVERY_TIER
    assert not [tier.error for tier in metrics.tiers if tier.HasField("error")]


async def test_a_tls_server_refuses_plaintext_and_unknown_authorities(tls_stack: Stack) -> None:
    other = trustme.CA()
    for tls in (None, Tls(ca=other.cert_pem.bytes())):
        async with CoordinatorClient(tls_stack.coordinate.target, tls=tls, timeout=5.0) as client:
            with pytest.raises(UnavailableError):
                await client.list_goals(pb.ListGoalsRequest())
    await tls_stack.coordinator.list_goals(pb.ListGoalsRequest())  # and serves on for those who trust it


async def test_mutual_tls_serves_only_callers_with_a_certificate_of_its_authority(ca: trustme.CA) -> None:
    settings = Settings(tls=server_tls(ca, client_auth=True))
    async with open_stack(settings, client_tls=caller_tls(ca)) as stack:
        last = await pursue(stack.coordinator)  # every hop below presents the tier's certificate
        assert last.WhichOneof("payload") == "goal_completed", last
        stranger = trustme.CA()
        refused = (Tls(ca=ca.cert_pem.bytes()), caller_tls(stranger, trusted=ca))
        for tls in refused:
            async with CoordinatorClient(stack.coordinate.target, tls=tls, timeout=5.0) as client:
                with pytest.raises(UnavailableError):
                    await client.list_goals(pb.ListGoalsRequest())


async def test_grpcurl_calls_a_mutual_tls_server_with_a_certificate_and_a_key(
    ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    caller = ca.issue_cert("grpcurl.example.com")
    ca.cert_pem.write_to_path(files["ca"])
    files["cert"].write_bytes(chain(caller))
    caller.private_key_pem.write_to_path(files["key"])
    store = SqliteKeyStore.in_folder(tmp_path)
    await store.open()
    tier, runner = issue("system", Role.TIER, "tiers"), issue("acme", Role.RUN, "grpcurl")
    for issued in (tier, runner):
        await store.add(issued)
    await store.close()
    settings = Settings(data_dir=tmp_path, tls=server_tls(ca, client_auth=True), auth=True, tier_key=tier.token)
    caplog.set_level(logging.INFO, logger="tierstack.audit")
    async with open_stack(settings, client_tls=caller_tls(ca)) as stack:
        security = ["-cacert", str(files["ca"]), "-cert", str(files["cert"]), "-key", str(files["key"])]
        security += ["-H", f"authorization: Bearer {runner.token}"]
        listed = await asyncio.to_thread(grpcurl, stack.execute.target, "list", security=security)
        assert "tierstack.v1.ExecutorService" in listed.split()
        echo = await asyncio.to_thread(
            grpcurl,
            stack.execute.target,
            "-d",
            '{"call": {"tool": "core.echo", "arguments": {"value": "over mTLS"}}}',
            "tierstack.v1.ExecutorService/ExecuteTool",
            security=security,
        )
        assert json.loads(echo)["result"]["output"] == "over mTLS"
    # The audit log names the caller by its key and by the certificate the CA vouched for.
    audited = [record for record in caplog.records if record.name == "tierstack.audit"]
    assert [(r.tenant, r.caller, r.peer) for r in audited] == [("acme", runner.key.key_id, "grpcurl.example.com")]  # type: ignore[attr-defined]


async def test_three_processes_and_the_cli_speak_mutual_tls_from_the_environment(
    ca: trustme.CA, tmp_path: Path
) -> None:
    server = ca.issue_cert("127.0.0.1", "localhost")
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(files["ca"])
    files["cert"].write_bytes(chain(server))
    server.private_key_pem.write_to_path(files["key"])
    env = {
        **os.environ,
        "TIERSTACK_TLS_CA": str(files["ca"]),
        "TIERSTACK_TLS_CERT": str(files["cert"]),
        "TIERSTACK_TLS_KEY": str(files["key"]),
        "TIERSTACK_TLS_CLIENT_AUTH": "1",
        "COLUMNS": "200",
    }
    async with spawned_stack(tmp_path / "data", env) as tiers:
        assert all("(mutual TLS)" in "".join(tier.lines) for tier in tiers.values())
        target = tiers["coordinate"].target
        cli = await asyncio.create_subprocess_exec(
            *TIERSTACK, "goal", GOAL, "--target", target, stdout=asyncio.subprocess.PIPE, env=env
        )
        output, _ = await cli.communicate()
        assert cli.returncode == 0, output.decode()
        assert "goal completed" in output.decode()
        plain = {key: value for key, value in env.items() if not key.startswith("TIERSTACK_TLS_")}
        refused = await asyncio.create_subprocess_exec(
            *TIERSTACK, "goals", "list", "--target", target, stdout=asyncio.subprocess.PIPE, env=plain
        )
        await refused.communicate()
        assert refused.returncode != 0
        for tier in tiers.values():
            assert await stop(tier) == 0


async def test_a_server_off_loopback_refuses_plaintext_unless_told_insecure(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs TLS"):
        Settings(host="0.0.0.0")
    assert Settings(host="0.0.0.0", insecure=True).host == "0.0.0.0"
    # Calls to another machine carry keys: they need TLS too.
    for target in ("10.0.0.5:50053", "dns:///execute.internal:50053", "127.0.0.1:50053,10.0.0.6:50053"):
        with pytest.raises(ValueError, match="TIERSTACK_EXECUTE_TARGET is another machine"):
            Settings(execute_target=target)
        assert Settings(execute_target=target, insecure=True).execute_target == target
    for local in ("[::1]:50053", "localhost:50053", "dns:///localhost:50053", "127.0.0.1:1,127.0.0.1:2"):
        assert Settings(execute_target=local).execute_target == local
    served = await asyncio.create_subprocess_exec(
        *TIERSTACK,
        "serve",
        "execute",
        "--host",
        "0.0.0.0",
        "--port",
        "0",
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "TIERSTACK_EXECUTE_METRICS_PORT": "off", "TIERSTACK_DATA_DIR": str(tmp_path)},
    )
    _, errors = await served.communicate()
    assert served.returncode == 2
    lines = errors.decode().splitlines()
    assert "needs TLS" in lines[-1] and "--insecure" in lines[-1]
    assert not any("Traceback" in line or "serving on" in line for line in lines)
