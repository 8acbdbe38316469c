"""Page sizes and opaque page tokens of the ledger's listings."""

from __future__ import annotations

import base64
import datetime as dt
import json

from services.common import errors as E
from services.ledger import domain as D


def bounded_page_size(page_size: int, default: int, most: int) -> int:
    """The page size asked for (0: ``default``), at most ``most``; negative is INVALID_PAGE_SIZE."""
    if page_size < 0:
        raise E.InvalidArgument("INVALID_PAGE_SIZE", "page_size must be >= 0", {"field": "page_size"})
    return min(page_size or default, most)


def bad_token() -> E.InvalidArgument:
    """The error for a page token this service did not make."""
    return E.InvalidArgument("INVALID_PAGE_TOKEN", "page_token is malformed", {"field": "page_token"})


def encode_parts(*parts: str) -> str:
    """An opaque page token: the keyset values, urlsafe base64 of their JSON."""
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).decode().rstrip("=")


def decode_parts(token: str, n: int) -> list[str]:
    """The ``n`` keyset values of a token from :func:`encode_parts` (INVALID_PAGE_TOKEN otherwise)."""
    try:
        parts = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, TypeError):
        raise bad_token() from None
    if not isinstance(parts, list) or len(parts) != n or not all(isinstance(p, str) for p in parts):
        raise bad_token()
    return parts


def decode_token(token: str) -> tuple[dt.datetime, int]:
    """An entries page token: (created_at, id) of the last entry shown."""
    try:
        us, _, ident = token.partition(".")
        return D.from_us(int(us)), int(ident)
    except (ValueError, OverflowError):
        raise E.InvalidArgument("INVALID_PAGE_TOKEN", "page_token is malformed", {"field": "page_token"}) from None
