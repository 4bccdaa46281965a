"""Workspace retention: a workspace nothing has changed in for the retention period is removed."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

_log = logging.getLogger(__name__)


def last_change(folder: Path) -> float:
    """Returns when anything in ``folder`` (itself included) last changed, in seconds since the
    epoch; links are looked at, never followed."""
    newest = folder.lstat().st_mtime
    for root, folders, files in os.walk(folder, followlinks=False):
        for name in (*folders, *files):
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except FileNotFoundError:  # removed while we looked: a change, but no later than now
                continue
    return newest


def remove_stale(workspaces: Path, before: float) -> int:
    """Removes every workspace in ``workspaces`` unchanged since ``before`` (seconds since the epoch)
    and returns how many went. Blocking: run it in a thread. Only real folders are removed, and
    nothing a link points to.
    """
    if not workspaces.is_dir():
        return 0
    removed = 0
    with os.scandir(workspaces) as entries:
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                continue
            folder = Path(entry.path)
            if last_change(folder) >= before:
                continue
            shutil.rmtree(folder)  # removes links themselves, never what they point to
            removed += 1
    if removed:
        _log.info("removed %d workspaces unchanged for longer than the retention", removed)
    return removed
