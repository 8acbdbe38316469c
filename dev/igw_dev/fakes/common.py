"""Shared by the fake providers: names, constants, fault rules and the recorded state."""


from __future__ import annotations

import itertools
import json
import random
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

Kind = Literal["openai", "anthropic", "gemini"]
KINDS: tuple[str, ...] = ("openai", "anthropic", "gemini")
FAULT_MODES = frozenset(
    {
        "error",
        "malformed_json",
        "truncated_stream",
        "slow_drip",
        "endless",
        "hang",
        "redirect",
        "stream_error",
        "echo_key_error",
        "no_usage",
        "ok",
    }
)

_TOOL_ARGS = '{"city": "Paris"}'
_TOOL_FRAGMENTS = ('{"ci', 'ty": "Pa', 'ris"}')
_ANTHROPIC_TOOL_PREFACE = "Let me check."
_WORDS = re.compile(r"\S+\s*")
_DEFAULT_REDIRECT = "http://169.254.169.254/latest/meta-data/"
_RATE_LIMIT = 10_000


def _fmt_secs(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"



def base_url_for(kind: str, host: str, port: int) -> str:
    """The base URL an adapter expects for a fake of ``kind``."""
    root = f"http://{host}:{port}"
    return f"{root}/v1" if kind in ("openai", "openai_compatible") else root


def _words(text: str) -> int:
    return len(text.split())


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- faults / state


@dataclass(slots=True)
class FaultRule:
    """One fault-injection rule (see module docstring)."""

    match_model: str = "*"
    status: int | None = None
    retry_after: float | None = None
    times: int | None = None
    probability: float = 1.0
    delay_ms: int = 0
    mode: str = "error"
    error_type: str | None = None
    message: str | None = None
    location: str | None = None
    interval_ms: int | None = None
    match_stream: bool | None = None

    @classmethod
    def from_json(cls, raw: Any) -> FaultRule:
        """Validate and build a rule from decoded JSON."""
        if not isinstance(raw, dict):
            raise ValueError("rule must be an object")
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown rule fields: {sorted(unknown)}")
        rule = cls(**raw)
        if rule.mode not in FAULT_MODES:
            raise ValueError(f"unknown mode {rule.mode!r}")
        if not 0.0 <= float(rule.probability) <= 1.0:
            raise ValueError("probability must be in [0, 1]")
        return rule


@dataclass
class FakeState:
    """Mutable state of one fake server."""

    kind: str
    api_key: str | None = None
    delay_ms: int = 0
    chunk_delay_ms: int = 0
    rules: list[FaultRule] = field(default_factory=list)
    requests: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=1000))
    stats: dict[str, int] = field(default_factory=dict)
    by_status: dict[str, int] = field(default_factory=dict)
    rng: random.Random = field(default_factory=lambda: random.Random(1234))
    counter: itertools.count[int] = field(default_factory=itertools.count)

    def bump(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def pick_fault(self, model: str, stream: bool) -> FaultRule | None:
        for rule in self.rules:
            if rule.match_model not in ("*", model):
                continue
            if rule.match_stream is not None and rule.match_stream != stream:
                continue
            if rule.times is not None and rule.times <= 0:
                continue
            if rule.probability < 1.0 and self.rng.random() >= rule.probability:
                continue
            if rule.times is not None:
                rule.times -= 1
            self.bump("faults_applied")
            return rule
        return None


STATE_KEY: web.AppKey[FakeState] = web.AppKey("igw_fake_state", FakeState)
