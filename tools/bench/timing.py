"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def timed(run: Callable[[], Awaitable[Any]], repeat: int) -> float:
    """Returns the median seconds of one run, after a warm-up run."""
    await run()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        await run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


async def interleaved(runners: dict[str, Callable[[], Awaitable[Any]]], repeat: int) -> dict[str, list[float]]:
    """Times each runner once per round, round after round, so drift in the machine hits all alike."""
    for run in runners.values():
        await run()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeat):
        for name, run in runners.items():
            start = time.perf_counter()
            await run()
            samples[name].append(time.perf_counter() - start)
    return samples
