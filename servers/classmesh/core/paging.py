"""Opaque page tokens: keyset cursors encoded so callers cannot depend on their shape."""

from __future__ import annotations

import base64
import json
from typing import Any

from classmesh.core.errors import InvalidArgument

__all__ = ["encode_page_token", "decode_page_token", "page_size"]


def encode_page_token(*values: Any) -> str:
    raw = json.dumps(list(values), separators=(",", ":"), default=str).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(
    token: str, arity: int, *, reason: str = "PAGE_TOKEN_INVALID"
) -> list[Any] | None:
    """The cursor values, or None for an empty token; garbage is INVALID_ARGUMENT.

    `reason` is the ErrorInfo reason of that error; every service sends PAGE_TOKEN_INVALID.
    """
    if not token:
        return None
    try:
        if len(token) > 1024:
            raise ValueError("too long")
        padded = token + "=" * (-len(token) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(values, list) or len(values) != arity:
            raise ValueError("shape")
    except (ValueError, UnicodeError) as exc:
        raise InvalidArgument(
            [("page_token", "not a page token returned by this API")], reason=reason
        ) from exc
    return values


def page_size(requested: int, *, default: int, cap: int) -> int:
    """Clamp a requested page size: 0 means the default; negatives are rejected."""
    if requested < 0:
        raise InvalidArgument([("page_size", "must be between 0 and %d" % cap)])
    return default if requested == 0 else min(requested, cap)
