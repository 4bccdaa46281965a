"""The wire contracts: generated code matches protos/, and buf lint (STANDARD + COMMENTS) is clean."""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

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


def test_the_workflow_schema_ships_and_accepts_the_examples() -> None:
    schema = json.loads((resources.files("tierstack.v1") / "workflow.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for example in (ROOT / "examples").glob("*.yaml"):
        errors = [error.message for error in validator.iter_errors(yaml.safe_load(example.read_text()))]
        assert errors == [], example
    bad = {"name": "x", "steps": [{"id": "a", "tool": "core.echo", "dependsOn": "a", "colour": "red"}]}
    messages = sorted(error.message for error in validator.iter_errors(bad))
    assert any("'colour' was unexpected" in message for message in messages)
    assert any("is not of type 'array'" in message for message in messages)
