"""The baseline: a bare grpc.aio server (under uvloop) that echoes the request bytes back.

Prints ``serving on HOST:PORT`` once it listens, then serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc
import uvloop

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Echo"


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def main() -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"serving on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    uvloop.run(main())
