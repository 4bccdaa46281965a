"""Each server's /metrics, scraped by a real Prometheus server that the test starts."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import httpx

from tests.helpers import free_port, open_stack
from tierstack.core.values import to_struct
from tierstack.server import Settings
from tierstack.v1 import common_pb2, executor_service_pb2


class Prometheus:
    """A Prometheus server on 127.0.0.1 scraping the targets it is given every 200 ms."""

    def __init__(self, folder: Path, targets: list[str]) -> None:
        binary = shutil.which("prometheus")
        assert binary is not None, "prometheus is not installed (apt-get install prometheus)"
        self.url = f"http://127.0.0.1:{free_port()}"
        config = folder / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 200ms, evaluation_interval: 1s}\n"
            f"scrape_configs: [{{job_name: tierstack, static_configs: [{{targets: {targets}}}]}}]\n"
        )
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def query(self, expression: str) -> list[dict[str, object]]:
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await client.get(f"{self.url}/api/v1/query", params={"query": expression})
        response.raise_for_status()
        result: list[dict[str, object]] = response.json()["data"]["result"]
        return result

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


async def test_prometheus_scrapes_every_tier_and_answers_a_histogram_quantile(data_dir: Path, tmp_path: Path) -> None:
    prometheus_folder = tmp_path / "prometheus"
    prometheus_folder.mkdir()
    async with open_stack(Settings(data_dir=data_dir, metrics_port=0)) as stack:
        servers = (stack.execute, stack.orchestrate, stack.coordinate)
        async with httpx.AsyncClient(trust_env=False) as client:
            text = (await client.get(f"http://127.0.0.1:{stack.execute.metrics_port}/metrics")).text
        assert "# TYPE tierstack_rpc_duration_seconds histogram" in text
        assert 'tierstack_process_resident_memory_bytes{tier="execute"}' in text
        echo = executor_service_pb2.ExecuteToolRequest(
            call=common_pb2.ToolCall(tool="core.echo", arguments=to_struct({"value": 1}))
        )
        for _ in range(50):
            await stack.executor.execute_tool(echo)
        prometheus = Prometheus(prometheus_folder, [f"127.0.0.1:{server.metrics_port}" for server in servers])
        try:
            selector = (
                'tierstack_rpc_duration_seconds_bucket{tier="execute",'
                'method="/tierstack.v1.ExecutorService/ExecuteTool",code="OK"}'
            )
            expression = f"histogram_quantile(0.99, sum by (le) ({selector}))"
            found: list[dict[str, object]] = []
            up: list[dict[str, object]] = []
            for _ in range(300):  # Prometheus starts, scrapes every target, then answers
                try:
                    found, up = await prometheus.query(expression), await prometheus.query("up == 1")
                except httpx.HTTPError:
                    found, up = [], []
                if found and len(up) == 3:
                    break
                await asyncio.sleep(0.1)
            [sample] = found
            value = sample["value"]
            assert isinstance(value, list) and 0 < float(value[1]) < float("inf")  # a quantile, from real buckets
            # Prometheus counted every call the server served, in the series of its method and code.
            [counted] = await prometheus.query(selector.replace("_bucket{", "_count{"))
            counted_value = counted["value"]
            assert isinstance(counted_value, list) and float(counted_value[1]) == 50
            assert len(up) == 3
            tiers = await prometheus.query("tierstack_process_resident_memory_bytes")
            assert sorted(s["metric"]["tier"] for s in tiers) == ["coordinate", "execute", "orchestrate"]  # type: ignore[index]
        finally:
            await asyncio.to_thread(prometheus.close)
