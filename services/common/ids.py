"""Identifier rules, one place for all three services.

Each pattern is anchored and bounded; services validate with these and raise their own
``InvalidArgument`` (never echoing the value, which may be a secret pasted into the wrong field).

- ``SEGMENT``: a team, agent, operator or key name. It is a SPIFFE path segment, so the rule is the
  one certificates carry: 1-64 of ``A-Z a-z 0-9 . _ -``.
- ``REQUEST_ID``: an idempotency key (AIP-155), also used as a reservation's request id:
  1-128 of ``A-Z a-z 0-9 . _ : -``.
- ``PRICE_KEY``: a model or provider name as the ledger's price book keys it: 1-128 of
  ``A-Z a-z 0-9 . _ : -``.
- ``CONFIG_NAME``: an alias, deployment or provider name in the routing config: starts alphanumeric,
  then up to 127 of ``A-Z a-z 0-9 . _ : -``.
"""

from __future__ import annotations

import re
from typing import Final

SEGMENT: Final = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")
REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")
PRICE_KEY: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")
CONFIG_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")


def is_segment(value: object) -> bool:
    """True for a valid team, agent, operator or key name."""
    return isinstance(value, str) and SEGMENT.match(value) is not None


def is_request_id(value: object) -> bool:
    """True for a valid request id."""
    return isinstance(value, str) and REQUEST_ID.match(value) is not None
