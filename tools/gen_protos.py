"""Generates Python messages, gRPC stubs, typed stubs and the workflow file JSON Schema from protos/
into generated/.

Usage: ``python tools/gen_protos.py [OUT_DIR]`` (default: ``generated``). The tests call it with a
temporary directory and compare the result with the committed tree, so stale code fails the run.
"""

from __future__ import annotations

import json
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE_DIR = Path("tierstack") / "v1"


def generate(out_dir: Path) -> None:
    """Regenerates ``out_dir/tierstack/v1`` from every proto file under protos/."""
    target = out_dir / PACKAGE_DIR
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    bin_dir = Path(sys.executable).parent
    well_known = resources.files("grpc_tools") / "_proto"
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    args = [
        "protoc",
        f"--proto_path={PROTOS}",
        f"--proto_path={well_known}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (target / "py.typed").touch()
    (target / "workflow.schema.json").write_text(json.dumps(workflow_schema(), indent=2, sort_keys=True) + "\n")


_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_INT32: {"type": "integer"},
    FieldDescriptor.TYPE_INT64: {"type": ["integer", "string"]},
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.Duration": {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?s$"},
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
}


def _field_schema(field: FieldDescriptor, defs: dict[str, Any]) -> dict[str, Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value = field.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": _single(value, defs)}
    single = _single(field, defs)
    return {"type": "array", "items": single} if field.is_repeated else single


def _single(field: FieldDescriptor, defs: dict[str, Any]) -> dict[str, Any]:
    if field.enum_type is not None:
        return {"enum": [value.name for value in field.enum_type.values]}
    if field.message_type is not None:
        return _message_schema(field.message_type, defs)
    return dict(_SCALARS[field.type])


def _message_schema(message: Descriptor, defs: dict[str, Any]) -> dict[str, Any]:
    if message.full_name in _WELL_KNOWN:
        return dict(_WELL_KNOWN[message.full_name])
    if message.name not in defs:
        defs[message.name] = {}  # placed first, so recursive messages refer to themselves
        properties: dict[str, Any] = {}
        for field in message.fields:
            schema = _field_schema(field, defs)
            properties[field.name] = schema
            properties[field.json_name] = schema
        defs[message.name] = {"type": "object", "additionalProperties": False, "properties": properties}
    return {"$ref": f"#/$defs/{message.name}"}


def workflow_schema() -> dict[str, Any]:
    """Returns the JSON Schema of a workflow file: the JSON mapping of ``tierstack.v1.Workflow``."""
    from tierstack.v1 import orchestrator_service_pb2

    defs: dict[str, Any] = {}
    root = _message_schema(orchestrator_service_pb2.Workflow.DESCRIPTOR, defs)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://tierstack.dev/schemas/v1/workflow.schema.json",
        "title": "tierstack workflow",
        "description": "A workflow file (YAML or JSON): the JSON mapping of the tierstack.v1.Workflow message.",
        **root,
        "$defs": defs,
    }


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "generated")
