"""The wire contracts: generated code matches protos/, and buf lint (STANDARD + COMMENTS) is clean."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_protos.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = tmp_path / "tierstack" / "v1"
    committed = ROOT / "generated" / "tierstack" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in committed.iterdir() if p.name != "__pycache__"), "run `make gen`"
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
    assert not mismatch and not errors, f"generated/ is stale for {mismatch + errors}: run `make gen`"


def test_buf_lint_is_clean() -> None:
    buf = shutil.which("buf") or shutil.which("buf", path=str(ROOT / ".tools" / "node_modules" / ".bin"))
    assert buf is not None, "buf is missing: `make tools` installs it from npm (@bufbuild/buf)"
    done = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
