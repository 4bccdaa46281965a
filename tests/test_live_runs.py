"""The short round of CI of ``python -m tools.live_runs`` (which holds 50,000): many runs live at once
through the servers, as processes of their own, all complete and none fails."""

from __future__ import annotations

from pathlib import Path

from tools.live_runs import live_runs


async def test_many_live_runs_through_the_servers_all_complete(tmp_path: Path) -> None:
    report = await live_runs(1_500, tmp_path, timeout=600)
    assert report.most_live >= 1_000, "the runs were live at once"
    assert report.ended == {"RUN_STATE_COMPLETED": 1_500}
    assert report.failures == 0
