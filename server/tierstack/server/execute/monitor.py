"""The per-tool monitor: calls, failures, latency percentiles and the latest error of every tool."""

from __future__ import annotations

from dataclasses import dataclass, field

from tierstack.server.metrics import LatencyHistogram
from tierstack.v1 import common_pb2


@dataclass(slots=True)
class ToolRecord:
    """What one tool's calls have looked like so far."""

    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    failures: int = 0
    last_error: common_pb2.ErrorDetail | None = None

    @property
    def average(self) -> float:
        """Returns the mean latency in seconds."""
        return self.latency.total / self.latency.count if self.latency.count else 0.0


class ToolMonitor:
    """Records every tool call; tells which tools are slow."""

    def __init__(self) -> None:
        self._records: dict[str, ToolRecord] = {}

    def record(self, tool: str, seconds: float, error: common_pb2.ErrorDetail | None) -> None:
        """Records one finished call."""
        found = self._records.get(tool)
        if found is None:
            found = self._records[tool] = ToolRecord()
        found.latency.record(seconds)
        if error is not None:
            found.failures += 1
            found.last_error = error

    def records(self) -> dict[str, ToolRecord]:
        """Returns the record of every tool called so far, by name."""
        return dict(sorted(self._records.items()))

    def slow(self, threshold: float) -> list[str]:
        """Returns the tools whose average latency is above ``threshold`` seconds, slowest first."""
        slow = [(record.average, tool) for tool, record in self._records.items() if record.average > threshold]
        return [tool for _, tool in sorted(slow, reverse=True)]
