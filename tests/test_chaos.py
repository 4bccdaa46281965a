"""The short chaos rounds of CI: 20 SIGKILLs of a random tier while workflows and goals arrive, and 10 of
a random replica of two of each tier on PostgreSQL (``python -m
tools.chaos`` runs the long one). ``TIERSTACK_CHAOS_SEED`` replays a round."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tools.chaos import chaos
from tools.postgres import LocalPostgres

SEED = int(os.environ.get("TIERSTACK_CHAOS_SEED", random.randrange(1 << 30)))


@pytest.mark.timeout(600)
async def test_twenty_kills_lose_nothing_and_do_nothing_twice(tmp_path: Path) -> None:
    report = await chaos(kills=20, runs=60, goals=15, seed=SEED, data_dir=tmp_path)
    print(report.summary())
    assert report.clean, f"seed {SEED}: {report.summary()}"
    assert sum(report.kills.values()) == 20


@pytest.mark.timeout(600)
async def test_ten_kills_of_two_replicas_of_each_tier_on_postgresql_lose_nothing(
    tmp_path: Path, postgres_server: LocalPostgres
) -> None:
    url = postgres_server.new_database()
    report = await chaos(kills=10, runs=30, goals=8, seed=SEED, data_dir=tmp_path, replicas=2, store_url=url)
    print(report.summary())
    assert report.clean, f"seed {SEED}: {report.summary()}"
