"""Pursue a goal through all three tiers with the SDK: `python examples/sdk_quickstart.py [TARGET]`."""

import asyncio
import sys

from tierstack.client import CoordinatorClient
from tierstack.v1 import coordinator_service_pb2 as pb


async def main(target: str) -> None:
    agents = [
        pb.Agent(id="analyst", capabilities=["analysis"]),
        pb.Agent(id="writer", capabilities=["writing"]),
    ]
    request = pb.CoordinateRequest(goal="analyze the survey, then write a summary", agents=agents)
    async with CoordinatorClient(target) as client:
        async for event in client.coordinate(request):
            print(event.sequence, event.WhichOneof("payload"))


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"))
