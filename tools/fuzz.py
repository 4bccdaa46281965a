"""Fuzzes the three tiers for longer than the test suite does: the same hostile requests
(tests/hostile.py), the same checks (tests/fuzzing.py), any count, time limit and seed.

Usage: ``python -m tools.fuzz [--calls N] [--seed N] [--seconds S] [--concurrency N]``; exits 1 when a
request got UNKNOWN, INTERNAL or DATA_LOSS, a tier went past its memory bound, or a tier does not
serve afterwards. Each failure is printed with the bytes that reproduce it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
from pathlib import Path

from tests.fuzzing import MEMORY_BOUND, session


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200_000, help="how many requests to send")
    parser.add_argument("--seed", type=int, default=None, help="the hypothesis seed; random when not given")
    parser.add_argument("--seconds", type=float, default=3600.0, help="the time limit")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    parser.add_argument(
        "--skip", action="append", default=[], metavar="SERVICE/METHOD", help="send this method nothing (repeatable)"
    )
    parser.add_argument("--memory-mib", type=int, default=MEMORY_BOUND >> 20, help="each tier's memory bound")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    with tempfile.TemporaryDirectory(prefix="tierstack-fuzz-") as workdir:
        report = asyncio.run(
            session(
                Path(workdir),
                calls=args.calls,
                seed=seed,
                seconds=args.seconds,
                memory_bound=args.memory_mib << 20,
                concurrency=args.concurrency,
                skip=frozenset(args.skip),
            )
        )
    print(report.summary())
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
