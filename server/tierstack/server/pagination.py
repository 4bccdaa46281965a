"""Opaque page tokens, read the same way by every List RPC (the boundary bounds page sizes)."""

from __future__ import annotations

import base64
import binascii

from tierstack.server.errors import InvalidArgumentError, Violation


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
