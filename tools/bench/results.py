"""What a benchmark found: markdown tables (printed as they are made), latency samples per tier and
comparisons against baselines, saved as JSON for the report."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Comparison:
    """One figure of tierstack against its baseline, measured in the same run."""

    name: str
    ours: float
    baseline: float
    unit: str
    lower_is_better: bool = True

    @property
    def factor(self) -> float:
        """Returns how many times better tierstack does (below 1: worse)."""
        if self.lower_is_better:
            return self.baseline / self.ours if self.ours else float("inf")
        return self.ours / self.baseline if self.baseline else float("inf")


@dataclass
class Results:
    """Collects a benchmark's findings."""

    tables: list[str] = field(default_factory=list)
    samples_ms: dict[str, list[float]] = field(default_factory=dict)
    comparisons: list[Comparison] = field(default_factory=list)

    def table(self, title: str, header: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "") -> None:
        """Prints a markdown table under ``title`` (and ``note`` after it) and keeps it."""
        lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
        if note:
            lines += ["", note]
        text = "\n".join(lines) + "\n"
        print(text)
        self.tables.append(text)

    def samples(self, series: str, seconds: Sequence[float]) -> None:
        """Keeps latency samples of a series (in seconds; stored in ms)."""
        self.samples_ms.setdefault(series, []).extend(s * 1000 for s in seconds)

    def compare(self, name: str, ours: float, baseline: float, unit: str, *, lower_is_better: bool = True) -> None:
        """Keeps one figure against its baseline."""
        self.comparisons.append(Comparison(name, ours, baseline, unit, lower_is_better))

    def save(self, path: Path | None) -> None:
        """Writes the findings as JSON, when a path is given."""
        if path is not None:
            document = {
                "tables": self.tables,
                "samples_ms": self.samples_ms,
                "comparisons": [asdict(c) for c in self.comparisons],
            }
            path.write_text(json.dumps(document))

    @classmethod
    def load(cls, path: Path) -> Results:
        """Reads findings :meth:`save` wrote."""
        document = json.loads(path.read_text())
        return cls(document["tables"], document["samples_ms"], [Comparison(**c) for c in document["comparisons"]])
