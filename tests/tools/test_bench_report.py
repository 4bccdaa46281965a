"""The benchmark report: its markdown and its chart, from findings the benchmarks saved."""

from __future__ import annotations

from pathlib import Path

from tools.bench.report import chart, markdown
from tools.bench.results import Results


def test_the_report_states_each_figure_against_its_baseline_and_draws_them(tmp_path: Path) -> None:
    found = Results()
    found.table("Execute", ("server", "p50 ms"), [("echo", "0.500"), ("tierstack", "0.600")])
    found.samples("execute: ExecuteTool", [0.0005, 0.0006, 0.0007, 0.002])
    found.samples("baseline: echo", [0.0004, 0.0005])
    found.compare("no-op call p50", 0.6, 0.5, "ms")
    found.compare("µs per step (vs LangGraph)", 44.0, 209.0, "µs")
    found.compare("calls/s", 7000, 4000, "calls/s", lower_is_better=False)
    saved = tmp_path / "found.json"
    found.save(saved)
    text = markdown(Results.load(saved))
    assert "| no-op call p50 | 0.600 | 0.500 | ms | 1.20x worse |" in text
    assert "| µs per step (vs LangGraph) | 44.000 | 209.000 | µs | 4.75x better |" in text
    assert "| calls/s | 7,000.000 | 4,000.000 | calls/s | 1.75x better |" in text
    assert "| tierstack | 0.600 |" in text
    picture = tmp_path / "benchmarks.png"
    chart(found, picture)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000
