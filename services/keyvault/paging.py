"""Page sizes and opaque page tokens of the vault's List RPCs."""

from __future__ import annotations

import base64
import binascii
import json
from typing import TypeVar

from services.common import errors as E

DEFAULT_PAGE = 100
MAX_PAGE = 1000
_T = TypeVar("_T")


def page_size(value: int) -> int:
    """The page size asked for: 0 means the default, above the maximum means the maximum."""
    if value < 0:
        raise E.InvalidArgument("PAGE_SIZE_INVALID", "page_size must not be negative", {"field": "page_size"})
    return DEFAULT_PAGE if value == 0 else min(value, MAX_PAGE)


def encode_token(field: str, value: object) -> str:
    """An opaque page token carrying where the next page starts."""
    return base64.urlsafe_b64encode(json.dumps({field: value}).encode()).decode()


def decode_token(token: str, field: str, kind: type[_T]) -> _T | None:
    """Where the next page starts (None for the first page); raises InvalidArgument(PAGE_TOKEN_INVALID)."""
    if not token:
        return None
    try:
        value = json.loads(base64.urlsafe_b64decode(token.encode()))[field]
    except (ValueError, KeyError, TypeError, binascii.Error):
        value = None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise E.InvalidArgument("PAGE_TOKEN_INVALID", "page_token is invalid", {"field": "page_token"})
    return value
