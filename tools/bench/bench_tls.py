"""What TLS, mutual TLS and API keys cost per call, against plaintext, in one run.

Four Execute servers run in their own processes under uvloop: plaintext, plaintext with API keys
checked (``TIERSTACK_AUTH=on``: the key's digest checked on every call, the key read from the store
every 5 s), TLS, and mutual TLS (with certificates made for the run). One client process calls each
with the same no-op tool call, in alternating rounds, on a channel it keeps (the steady state of a
tier calling the tier below), at concurrency 1 and 16; then on a new channel per call (a handshake
each time, the worst case).

Usage: ``python -m tools.bench.bench_tls [--requests N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import trustme
import uvloop

from tierstack.client import ExecutorClient, Tls
from tierstack.core.values import to_struct
from tierstack.server.auth import Role, SqliteKeyStore, issue
from tierstack.v1 import common_pb2, executor_service_pb2
from tools.bench.bench_execute import ROUNDS, Result, measure, median
from tools.bench.processes import serving
from tools.bench.results import Results

SECURITY = ("plaintext", "API key", "TLS", "mutual TLS")


def certificates(folder: Path) -> tuple[dict[str, str], Tls, Tls]:
    """Writes a CA and a server certificate into ``folder``; returns the environment of a TLS server
    and the TLS of a caller without and with a certificate."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    caller = ca.issue_cert("bench")
    paths = {name: folder / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(paths["ca"])
    paths["cert"].write_bytes(chain(server))
    server.private_key_pem.write_to_path(paths["key"])
    env = {f"TIERSTACK_TLS_{name.upper()}": str(path) for name, path in paths.items()}
    return (
        env,
        Tls(ca=ca.cert_pem.bytes()),
        Tls(ca=ca.cert_pem.bytes(), certificate=chain(caller), key=caller.private_key_pem.bytes()),
    )


async def api_key(folder: Path) -> str:
    """Keeps a key of the RUN role in the SQLite key store in ``folder`` and returns it."""
    store = SqliteKeyStore.in_folder(folder)
    await store.open()
    try:
        issued = issue("bench", Role.RUN)
        await store.add(issued)
    finally:
        await store.close()
    return issued.token


def chain(cert: trustme.LeafCert) -> bytes:
    return b"".join(blob.bytes() for blob in cert.cert_chain_pems)


async def main(requests: int, results: Results) -> None:
    request = executor_service_pb2.ExecuteToolRequest(
        call=common_pb2.ToolCall(tool="core.echo", arguments=to_struct({"value": "x" * 64}))
    )
    with tempfile.TemporaryDirectory() as folder:
        env, server_only, mutual = certificates(Path(folder))
        token = await api_key(Path(folder))
        environments = {
            "plaintext": {},
            "API key": {"TIERSTACK_AUTH": "on"},
            "TLS": env,
            "mutual TLS": {**env, "TIERSTACK_TLS_CLIENT_AUTH": "1"},
        }
        callers: dict[str, Tls | None] = {"plaintext": None, "API key": None, "TLS": server_only, "mutual TLS": mutual}
        keys = {name: token if name == "API key" else "" for name in SECURITY}
        async with AsyncExitStack() as stack:
            targets = {}
            for name in SECURITY:
                command = (sys.executable, "-m", "tierstack.cli", "serve", "execute", "--port", "0")
                extra = {**environments[name], "TIERSTACK_EXECUTE_METRICS_PORT": "off", "TIERSTACK_DATA_DIR": folder}
                targets[name], _ = await stack.enter_async_context(serving(*command, env=extra))
            clients = {
                name: await stack.enter_async_context(
                    ExecutorClient(targets[name], tls=callers[name], api_key=keys[name])
                )
                for name in SECURITY
            }

            async def fresh(name: str) -> None:
                async with ExecutorClient(targets[name], tls=callers[name], api_key=keys[name]) as client:
                    await client.execute_tool(request)

            def kept(name: str) -> Callable[[], Awaitable[object]]:
                return lambda: clients[name].execute_tool(request)

            def new(name: str) -> Callable[[], Awaitable[object]]:
                return lambda: fresh(name)

            rows = []
            for label, series, count, concurrency in (
                ("kept channel", kept, requests, 1),
                ("kept channel", kept, requests, 16),
                ("new channel per call", new, max(requests // 10, 100), 1),
            ):
                rounds: dict[str, list[Result]] = {name: [] for name in SECURITY}
                for _ in range(ROUNDS):  # alternating rounds, so drift in the machine hits all alike
                    for name in SECURITY:
                        result = await measure(series(name), requests=count // ROUNDS, concurrency=concurrency)
                        rounds[name].append(result)
                found = {name: median(runs) for name, runs in rounds.items()}
                base = found["plaintext"]
                for name, result in found.items():
                    rows.append(
                        (
                            label,
                            concurrency,
                            name,
                            f"{result.requests_per_second:,.0f}",
                            f"{result.p50_ms:.3f}",
                            f"{result.p99_ms:.3f}",
                            f"{result.p50_ms / base.p50_ms:.2f}",
                            f"{base.requests_per_second / result.requests_per_second:.2f}",
                        )
                    )
                    if name != "plaintext":
                        results.compare(
                            f"ExecuteTool p50 over {name}, {label}, c={concurrency} (vs plaintext)",
                            result.p50_ms,
                            base.p50_ms,
                            "ms",
                        )
    results.table(
        "Execute: a no-op tool call in plaintext, with an API key, over TLS and over mutual TLS",
        ("channel", "concurrency", "security", "req/s", "p50 ms", "p99 ms", "p50 vs plaintext", "cost vs plaintext"),
        rows,
        f"{requests} calls a kept-channel row in {ROUNDS} alternating rounds (medians); "
        "a new channel makes a TLS handshake on every call.",
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--json", type=Path, help="also write the findings here, for the report")
    arguments = parser.parse_args()
    found = Results()
    uvloop.run(main(arguments.requests, found))
    found.save(arguments.json)
