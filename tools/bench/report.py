"""Runs the benchmarks and writes their report: ``report.md`` (every table, and each figure against
its baseline) and ``benchmarks.png`` (latency histograms per tier, and the comparisons).

Usage: ``python -m tools.bench.report --out DIR [--quick]`` (or ``tierstack bench-report``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen: draw to files

import matplotlib.pyplot as plt
import numpy as np

from tools.bench.results import Comparison, Results

#: Each benchmark, with its arguments for a full and for a quick run.
BENCHMARKS = {
    "execute": (["--requests", "9000"], ["--requests", "1500"]),
    "orchestrate": (["--repeat", "5", "--live-runs", "10000"], ["--repeat", "2", "--live-runs", "1000"]),
    "coordinate": (["--repeat", "200"], ["--repeat", "30"]),
    "limits": (["--repeat", "5"], ["--repeat", "2"]),
}


def run_all(folder: Path, *, quick: bool) -> Results:
    """Runs every benchmark in a process of its own and merges their findings."""
    merged = Results()
    for name, (full, short) in BENCHMARKS.items():
        found = folder / f"{name}.json"
        command = [sys.executable, "-m", f"tools.bench.bench_{name}", *(short if quick else full), "--json", str(found)]
        subprocess.run(command, check=True)
        results = Results.load(found)
        merged.tables += results.tables
        merged.comparisons += results.comparisons
        for series, samples in results.samples_ms.items():
            merged.samples_ms.setdefault(series, []).extend(samples)
    return merged


def _verdict(comparison: Comparison) -> str:
    factor = comparison.factor
    return f"{factor:.2f}x better" if factor >= 1 else f"{1 / factor:.2f}x worse"


def markdown(results: Results) -> str:
    """Returns the report's text."""
    lines = ["# tierstack benchmarks", "", "## Against the baselines", ""]
    lines += ["| figure | tierstack | baseline | unit | |", "|---|---:|---:|---|---|"]
    lines += [
        f"| {c.name} | {c.ours:,.3f} | {c.baseline:,.3f} | {c.unit} | {_verdict(c)} |" for c in results.comparisons
    ]
    lines += ["", "![latency histograms and comparisons](benchmarks.png)", ""]
    return "\n".join(lines) + "\n" + "\n".join(results.tables)


def chart(results: Results, path: Path) -> None:
    """Draws the latency histograms per series (log-spaced bins) and the comparisons."""
    series = sorted(results.samples_ms.items())
    figure, axes = plt.subplots(len(series) + 1, 1, figsize=(10, 3 * (len(series) + 1)), constrained_layout=True)
    for axis, (name, samples) in zip(axes, series, strict=False):
        values = np.asarray(samples)
        bins = np.logspace(np.log10(max(values.min(), 1e-3)), np.log10(values.max() * 1.01), 40)
        axis.hist(values, bins=bins, color="tab:blue" if not name.startswith("baseline") else "tab:gray")
        axis.set_xscale("log")
        p50, p99 = np.percentile(values, [50, 99])
        axis.set_title(f"{name}: p50 {p50:.3f} ms, p99 {p99:.3f} ms ({len(values):,} samples)")
        axis.set_xlabel("latency (ms)")
        axis.set_ylabel("count")
    last = axes[-1]
    names = [c.name for c in results.comparisons]
    factors = [c.factor for c in results.comparisons]
    colours = ["tab:green" if f >= 1 else "tab:red" for f in factors]
    last.barh(names, factors, color=colours)
    last.axvline(1.0, color="black", linewidth=1)
    last.set_xscale("log")
    last.set_xlabel("times better than the baseline (log scale; right of 1 is better)")
    last.invert_yaxis()
    last.tick_params(axis="y", labelsize=7)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench-report"), help="the folder to write to")
    parser.add_argument("--quick", action="store_true", help="fewer rounds: a rough report in a minute or two")
    arguments = parser.parse_args()
    arguments.out.mkdir(parents=True, exist_ok=True)
    results = run_all(arguments.out, quick=arguments.quick)
    (arguments.out / "report.md").write_text(markdown(results))
    chart(results, arguments.out / "benchmarks.png")
    print(f"wrote {arguments.out / 'report.md'} and {arguments.out / 'benchmarks.png'}")


if __name__ == "__main__":
    main()
