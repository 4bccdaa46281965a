"""Page sizes and opaque page tokens, checked the same way by every List RPC."""

from __future__ import annotations

import base64
import binascii

from tierstack.server.errors import InvalidArgumentError, Violation


def page_size(requested: int, *, default: int, maximum: int) -> int:
    """Returns the page size to use, ``default`` for 0.

    Raises:
        InvalidArgumentError: ``requested`` is negative or above ``maximum``.
    """
    if requested < 0 or requested > maximum:
        raise InvalidArgumentError([Violation("page_size", f"must be between 0 and {maximum}, got {requested}")])
    return requested or default


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
