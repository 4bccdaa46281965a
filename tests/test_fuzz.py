"""The fuzz suite: hostile requests for every RPC (tests/hostile.py) sent to the three tiers running as
processes (tests/fuzzing.py). ``python -m tools.fuzz`` runs the same for longer, with any seed."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2

from tests.fuzzing import FORBIDDEN, session
from tests.hostile import METHODS, Case, Known, Shapes, generate
from tierstack.v1 import coordinator_service_pb2, executor_service_pb2, monitor_service_pb2, orchestrator_service_pb2

#: The requests one run sends. A run that its time limit ends sooner fails, so that a slow machine
#: cannot shrink the suite without anyone noticing.
CALLS = 10_000
#: The time limit of the run, past the tiers' start.
SECONDS = 540.0  # a bound on a loaded machine, not a speed goal: 10,000 calls take about a minute
#: The hypothesis seed of the run; ``python -m tools.fuzz --seed N`` draws the same requests.
SEED = 10

KNOWN = Known(
    tools={
        "core.echo": {"properties": {"value": {}}},
        "text.template": {"properties": {"template": {}, "variables": {}}},
        "json.query": {"properties": {"data": {}, "expression": {}}},
    },
    run_ids=("run-a", "run-b"),
    goal_ids=("goal-a",),
    url="http://127.0.0.1:9",
)


@pytest.mark.timeout(SECONDS + 100)
async def test_no_hostile_request_gets_an_unhandled_error_nor_harms_a_tier(tmp_path: Path) -> None:
    report = await session(tmp_path, calls=CALLS, seed=SEED, seconds=SECONDS)
    summary = report.summary()
    print(summary)
    tally = report.tally
    assert all(peak <= report.bound for peak in report.peaks.values()), summary
    assert not report.problems, summary
    assert not tally.failures, f"answers no request may get ({', '.join(FORBIDDEN)}):\n{summary}"
    assert tally.calls >= CALLS, f"only {tally.calls} of {CALLS} calls were made\n{summary}"
    assert {method.name for method in METHODS} <= set(tally.by_method), summary


def test_every_rpc_of_the_contract_and_the_health_service_is_fuzzed() -> None:
    files = (coordinator_service_pb2, executor_service_pb2, monitor_service_pb2, orchestrator_service_pb2, health_pb2)
    declared = {
        f"/{service.full_name}/{method.name}"
        for file in files
        for service in file.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert {method.path for method in METHODS} == declared


def test_the_same_seed_draws_the_same_requests() -> None:
    cases = Shapes(KNOWN).cases
    first = generate(cases, 40, seed=7)
    assert generate(cases, 40, seed=7) == first
    assert generate(cases, 40, seed=8) != first


def test_the_requests_carry_every_class_of_hostile_input() -> None:
    drawn = generate(Shapes(KNOWN).cases, 600, seed=3)
    decode_errors = set()
    values: list[tuple[FieldDescriptor, Any]] = []
    for case in drawn:
        try:
            values.extend(_fields(_decode(case)))
        except DecodeError as error:
            decode_errors.add(str(error).rsplit(": ", 1)[-1])
    assert {case.kind for case in drawn} == {"random", "mutated", "raw"}
    assert {
        "Exceeded upb_DecodeOptions_MaxDepth",
        "String field had bad UTF-8",
        "Wire format was corrupt",
    } <= decode_errors
    assert max(len(case.payload) for case in drawn) > 4 << 20, "no request is past the default message size"
    integers = {
        value
        for field, value in values
        if field.cpp_type in (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64)
    }
    assert integers & {2**31 - 1, -(2**31), -(2**31 - 1)} and integers & {2**63 - 1, -(2**63), -(2**63 - 1)}
    floats = [value for field, value in values if field.cpp_type == FieldDescriptor.CPPTYPE_DOUBLE]
    assert any(math.isnan(value) for value in floats) and any(math.isinf(value) for value in floats)
    unknown_enums = [
        value
        for field, value in values
        if field.enum_type is not None and value not in field.enum_type.values_by_number
    ]
    assert unknown_enums
    strings = [value for field, value in values if field.type == FieldDescriptor.TYPE_STRING]
    assert any("{%" in value for value in strings) and any("\x00" in value for value in strings)
    assert max(map(len, strings)) >= 100_000


def _decode(case: Case) -> Message:
    method = next(method for method in METHODS if method.path == case.method)
    return message_factory.GetMessageClass(method.input).FromString(case.payload)


def _fields(message: Message) -> Iterator[tuple[FieldDescriptor, Any]]:
    """Yields every scalar field set in ``message`` and the messages inside it, with its value."""
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].message_type is not None:
                for item in value.values():
                    yield from _fields(item)
        elif field.message_type is not None:
            for item in value if field.is_repeated else [value]:
                yield from _fields(item)
        else:
            for item in value if field.is_repeated else [value]:
                yield field, item
