"""Opaque page tokens, read the same way by every List RPC (the boundary bounds page sizes)."""

from __future__ import annotations

import base64
import binascii

from tierstack.core.errors import InvalidArgumentError, Violation


def encode_token(cursor: str) -> str:
    """Returns an opaque page token for ``cursor``."""
    return base64.urlsafe_b64encode(cursor.encode()).decode()


def decode_token(token: str) -> str:
    """Returns the cursor inside a page token; an empty token gives an empty cursor.

    Raises:
        InvalidArgumentError: The token was not made by :func:`encode_token`.
    """
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgumentError([Violation("page_token", "is not a token this server issued")]) from None


def decode_time_cursor(token: str) -> tuple[int, str] | None:
    """Returns the (create time in ns, id) cursor inside a page token of a listing by time, or None
    for an empty token.

    Raises:
        InvalidArgumentError: The token was not made by :func:`encode_time_cursor`.
    """
    cursor = decode_token(token)
    if not cursor:
        return None
    created, _, resource_id = cursor.partition(":")
    if not created.isdigit() or not resource_id:
        raise InvalidArgumentError([Violation("page_token", "is not a token this server issued")])
    return int(created), resource_id


def encode_time_cursor(create_ns: int, resource_id: str) -> str:
    """Returns the page token that continues a listing by time after (``create_ns``, ``resource_id``)."""
    return encode_token(f"{create_ns}:{resource_id}")
