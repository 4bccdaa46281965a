"""Conversion between plain JSON-like Python values and google.protobuf.Value / Struct."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TypeAlias

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

JSON: TypeAlias = bool | int | float | str | list["JSON"] | dict[str, "JSON"] | None


def to_value(obj: object) -> struct_pb2.Value:
    """Returns ``obj`` as a protobuf Value; tuples become lists, other types raise TypeError."""
    value = struct_pb2.Value()
    _fill(value, obj)
    return value


def _fill(value: struct_pb2.Value, obj: object) -> None:
    if obj is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(obj, bool):
        value.bool_value = obj
    elif isinstance(obj, int | float):
        value.number_value = obj
    elif isinstance(obj, str):
        value.string_value = obj
    elif isinstance(obj, Mapping):
        fields = value.struct_value.fields
        value.struct_value.SetInParent()
        for key, item in obj.items():
            _fill(fields[str(key)], item)
    elif isinstance(obj, list | tuple):
        items = value.list_value
        items.SetInParent()
        for item in obj:
            _fill(items.values.add(), item)
    else:
        raise TypeError(f"cannot convert {type(obj).__name__} to a JSON value")


def from_value(value: struct_pb2.Value) -> JSON:
    """Returns a protobuf Value as a plain Python value; whole numbers come back as int."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return from_struct(value.struct_value)
    if kind == "list_value":
        return [from_value(item) for item in value.list_value.values]
    return None


def to_struct(obj: Mapping[str, object]) -> struct_pb2.Struct:
    """Returns a mapping as a protobuf Struct."""
    return to_value(obj).struct_value


def from_struct(struct: struct_pb2.Struct) -> dict[str, JSON]:
    """Returns a protobuf Struct as a plain dict."""
    return {key: from_value(item) for key, item in struct.fields.items()}


def to_duration(seconds: float) -> duration_pb2.Duration:
    """Returns a span in seconds as a protobuf Duration."""
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def to_seconds(duration: duration_pb2.Duration) -> float | None:
    """Returns a protobuf Duration in seconds, or None for zero (which the contract reads as "none")."""
    nanos = duration.ToNanoseconds()
    return nanos / 1e9 if nanos > 0 else None


def now_timestamp() -> timestamp_pb2.Timestamp:
    """Returns the current time as a protobuf Timestamp."""
    nanos = time.time_ns()
    return timestamp_pb2.Timestamp(seconds=nanos // 1_000_000_000, nanos=nanos % 1_000_000_000)


def least_size(value: object, limit: int) -> int:
    """Returns a lower bound of the wire size of a plain JSON value as a protobuf Value, without
    building the message, and stops counting once it passes ``limit``: a value that refers to one
    list many times (as JMESPath's ``[@,@]`` does, or a template repeating a step's output) is found
    too large before it is ever expanded."""
    size = 0
    pending = [value]
    while pending and size <= limit:
        item = pending.pop()
        size += 2  # a tag and a length (or a one-byte payload) at the least
        if isinstance(item, str):
            size += len(item)
        elif isinstance(item, Mapping):
            size += sum(2 + len(str(key)) for key in item)
            if size <= limit:
                pending.extend(item.values())
        elif isinstance(item, list | tuple):
            size += 2 * len(item)
            if size <= limit:
                pending.extend(item)
    return size
