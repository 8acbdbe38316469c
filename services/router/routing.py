"""The routing config: YAML in version control, validated strictly, identified by SHA-256.

Shape (every key is checked; unknown keys are refused)::

    providers:
      openai: {type: openai, base_url: "https://api.openai.com/v1"}
      local-vllm: {type: openai_compatible, base_url: "http://127.0.0.1:8000/v1", local: true}
    deployments:
      gpt-4o-mini: {provider: openai, model: gpt-4o-mini, price: gpt-4o-mini,
                    context_window: 128000, supports_tools: true, supports_images: true, weight: 1}
    models:
      fast: {description: "...", strategy: priority, candidates: [gpt-4o-mini, ...], teams: [demo]}
    retries: {max_attempts: 3, backoff_initial_ms: 50, backoff_max_ms: 1000, retry_after_cap_ms: 2000}
    timeouts: {connect_ms: 2000, first_byte_ms: 30000, idle_ms: 30000, total_ms: 120000}
    breaker: {failure_threshold: 5, cooldown_ms: 30000, probe_timeout_ms: 10000}
    limits: {max_in_flight: 512, max_messages: 1000, max_request_bytes: 8388608,
             max_output_tokens: 200000, default_output_tokens: 1024}
    budget_slices: {enabled: true, calls: 64, draw_window_ms: 20000}   # the default (false: per-call holds)

Base URLs must be https unless the provider is marked ``local: true``: an OpenAI-compatible
server the platform runs itself (vLLM, Ollama) on this host or inside the cluster, which may
speak plain http (``http://vllm.inference.svc:8000/v1``). What ``local`` admits, and what no
provider may use (link-local, metadata, unspecified, multicast hosts), is one rule shared with
the vault: :mod:`services.common.egress`. Names that end up in URLs are restricted to a safe
alphabet.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.common import ids
from services.common.egress import EgressRefused, check_base_url
from services.router.providers.base import check_body_model, check_url_name

PROVIDER_TYPES = ("openai", "anthropic", "gemini", "openai_compatible")
STRATEGIES = ("priority", "cheapest", "latency", "weighted")
_NAME = ids.CONFIG_NAME
_TEAM = ids.SEGMENT


class ConfigError(ValueError):
    """The routing config does not validate; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Provider:
    """An upstream API endpoint."""

    name: str
    type: str
    base_url: str
    local: bool


@dataclass(frozen=True, slots=True)
class Deployment:
    """A provider + provider model + price key."""

    name: str
    provider: str
    model: str
    price: str
    context_window: int
    supports_tools: bool
    supports_images: bool
    supports_streaming: bool
    weight: int


@dataclass(frozen=True, slots=True)
class Alias:
    """A model name agents use, mapped to ordered candidate deployments."""

    name: str
    description: str
    strategy: str
    candidates: tuple[str, ...]
    teams: frozenset[str] | None  # None: every team

    def allows(self, team: str) -> bool:
        """Whether ``team`` may use this alias."""
        return self.teams is None or team in self.teams


@dataclass(frozen=True, slots=True)
class Retries:
    """How many attempts a call may make and how long to wait between them."""

    max_attempts: int = 3
    backoff_initial_ms: int = 50
    backoff_max_ms: int = 1000
    retry_after_cap_ms: int = 2000


@dataclass(frozen=True, slots=True)
class TimeoutsCfg:
    """Per-attempt upstream timeouts."""

    connect_ms: int = 2000
    first_byte_ms: int = 30000
    idle_ms: int = 30000
    total_ms: int = 120000


@dataclass(frozen=True, slots=True)
class BreakerCfg:
    """Circuit breaker settings, per deployment."""

    failure_threshold: int = 5
    cooldown_ms: int = 30000
    probe_timeout_ms: int = 10000


@dataclass(frozen=True, slots=True)
class Limits:
    """Request size limits and the router's admission limit."""

    max_in_flight: int = 512
    max_messages: int = 1000
    max_request_bytes: int = 8 * 1024 * 1024
    max_output_tokens: int = 200_000
    default_output_tokens: int = 1024


@dataclass(frozen=True, slots=True)
class SlicesCfg:
    """Budget slices, on by default (``enabled: false`` turns them off): the router leases a slice
    of a team's budget for up to ``calls`` calls and places per-call holds locally, drawing from it
    for ``draw_window_ms``.
    The ledger sizes each slice (a quarter of what is free at most, none near the limit, where
    calls take exact per-call holds). ``enabled: false`` gives every team per-call holds (a
    ``Reserve`` per call); ``teams``: only these teams use slices (None: every team);
    ``per_call_teams``: these teams take per-call holds. A key (team, agent, price) leases
    a slice only when busy: its ``busy_calls``-th (4th) call within ``busy_window_ms`` (other calls
    take exact per-call holds: an occasional caller holds nothing extra and sees a lowered budget at
    once), and with at least ``busy_in_flight`` (1) of its calls in flight at once (a higher value
    keeps a caller calling back to back on per-call holds). A sliced call's draw note lingers
    (services/router/draw_notes.py) to share its round trip with other calls', so even a lone
    caller saves the ``Reserve``; ``busy_calls: 1``: every call may use slices."""

    enabled: bool = True
    calls: int = 64
    draw_window_ms: int = 20_000
    teams: frozenset[str] | None = None
    per_call_teams: frozenset[str] = frozenset()
    busy_calls: int = 4
    busy_window_ms: int = 5_000
    busy_in_flight: int = 1

    def applies(self, team: str) -> bool:
        return self.enabled and (self.teams is None or team in self.teams) and team not in self.per_call_teams


@dataclass(frozen=True)
class RoutingConfig:
    """A validated routing config and its identity."""

    sha256: str
    source: str
    providers: Mapping[str, Provider]
    deployments: Mapping[str, Deployment]
    aliases: Mapping[str, Alias]
    retries: Retries = field(default_factory=Retries)
    timeouts: TimeoutsCfg = field(default_factory=TimeoutsCfg)
    breaker: BreakerCfg = field(default_factory=BreakerCfg)
    limits: Limits = field(default_factory=Limits)
    budget_slices: SlicesCfg = field(default_factory=SlicesCfg)


def _keys(where: str, obj: Any, required: set[str], optional: set[str]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: must be a mapping")
    unknown = set(obj) - required - optional
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
    missing = required - set(obj)
    if missing:
        raise ConfigError(f"{where}: missing key(s) {sorted(missing)}")
    return obj


def _int(where: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{where}: must be an integer in [{lo}, {hi}]")
    return value


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: must be true or false")
    return value


def _name(where: str, value: Any, pattern: re.Pattern[str] = _NAME) -> str:
    if not isinstance(value, str) or not pattern.match(value) or ".." in value:
        raise ConfigError(f"{where}: {value!r} is not a safe name")
    return value


def _model(where: str, value: Any, provider_type: str) -> str:
    """A provider model name, checked by the very rule its adapter applies (no config the adapter refuses)."""
    check = check_url_name if provider_type == "gemini" else check_body_model  # Gemini: a URL path segment
    try:
        return check(value)
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not a safe name") from None


def _base_url(where: str, value: Any, local: bool) -> str:
    try:
        check_base_url(value, local=local)  # the rule the vault applies too
    except EgressRefused as err:
        raise ConfigError(f"{where}: {err}") from None
    assert isinstance(value, str)
    return value.rstrip("/")


def _section(cls: Any, where: str, raw: Any, bounds: Mapping[str, tuple[int, int]]) -> Any:
    if raw is None:
        return cls()
    obj = _keys(where, raw, set(), set(bounds))
    return cls(**{k: _int(f"{where}.{k}", v, *bounds[k]) for k, v in obj.items()})


def parse_config(data: bytes, source: str = "<memory>") -> RoutingConfig:
    """Validates YAML bytes into a RoutingConfig; raises ConfigError."""
    try:
        raw = yaml.safe_load(data)
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML: {err}") from None
    top = _keys(
        "config",
        raw,
        {"providers", "deployments", "models"},
        {"version", "retries", "timeouts", "breaker", "limits", "budget_slices"},
    )
    if top.get("version", 1) != 1:
        raise ConfigError("config.version: only version 1 is known")
    providers: dict[str, Provider] = {}
    for name, p in (top["providers"] or {}).items():
        w = f"providers.{name}"
        _name(w, name)
        p = _keys(w, p, {"type", "base_url"}, {"local"})
        if p["type"] not in PROVIDER_TYPES:
            raise ConfigError(f"{w}.type: must be one of {PROVIDER_TYPES}")
        local = _bool(f"{w}.local", p.get("local", False))
        providers[name] = Provider(name, p["type"], _base_url(f"{w}.base_url", p["base_url"], local), local)
    deployments: dict[str, Deployment] = {}
    for name, d in (top["deployments"] or {}).items():
        w = f"deployments.{name}"
        _name(w, name)
        d = _keys(
            w,
            d,
            {"provider", "model", "price"},
            {"context_window", "supports_tools", "supports_images", "supports_streaming", "weight"},
        )
        if d["provider"] not in providers:
            raise ConfigError(f"{w}.provider: unknown provider {d['provider']!r}")
        deployments[name] = Deployment(
            name=name,
            provider=d["provider"],
            model=_model(f"{w}.model", d["model"], providers[d["provider"]].type),
            price=_name(f"{w}.price", d["price"]),
            context_window=_int(f"{w}.context_window", d.get("context_window", 128_000), 1, 10_000_000),
            supports_tools=_bool(f"{w}.supports_tools", d.get("supports_tools", True)),
            supports_images=_bool(f"{w}.supports_images", d.get("supports_images", False)),
            supports_streaming=_bool(f"{w}.supports_streaming", d.get("supports_streaming", True)),
            weight=_int(f"{w}.weight", d.get("weight", 1), 0, 1_000_000),
        )
    aliases: dict[str, Alias] = {}
    for name, a in (top["models"] or {}).items():
        w = f"models.{name}"
        _name(w, name)
        a = _keys(w, a, {"candidates"}, {"description", "strategy", "teams"})
        strategy = a.get("strategy", "priority")
        if strategy not in STRATEGIES:
            raise ConfigError(f"{w}.strategy: must be one of {STRATEGIES}")
        cands = a["candidates"]
        if not isinstance(cands, list) or not cands:
            raise ConfigError(f"{w}.candidates: must be a non-empty list")
        for c in cands:
            if c not in deployments:
                raise ConfigError(f"{w}.candidates: unknown deployment {c!r}")
        if len(set(cands)) != len(cands):
            raise ConfigError(f"{w}.candidates: duplicates")
        teams = a.get("teams")
        if teams is not None:
            if not isinstance(teams, list):
                raise ConfigError(f"{w}.teams: must be a list")
            teams = frozenset(_name(f"{w}.teams", t, _TEAM) for t in teams)
        desc = a.get("description", "")
        if not isinstance(desc, str):
            raise ConfigError(f"{w}.description: must be text")
        aliases[name] = Alias(name, desc, strategy, tuple(cands), teams)
    retries = _section(
        Retries,
        "retries",
        top.get("retries"),
        {"max_attempts": (1, 10), "backoff_initial_ms": (0, 60_000), "backoff_max_ms": (0, 60_000),
         "retry_after_cap_ms": (0, 60_000)},
    )
    timeouts = _section(
        TimeoutsCfg,
        "timeouts",
        top.get("timeouts"),
        {"connect_ms": (1, 60_000), "first_byte_ms": (1, 600_000), "idle_ms": (1, 600_000),
         "total_ms": (1, 3_600_000)},
    )
    breaker = _section(
        BreakerCfg,
        "breaker",
        top.get("breaker"),
        {"failure_threshold": (1, 1000), "cooldown_ms": (1, 3_600_000), "probe_timeout_ms": (1, 600_000)},
    )
    limits = _section(
        Limits,
        "limits",
        top.get("limits"),
        {"max_in_flight": (1, 100_000), "max_messages": (1, 10_000), "max_request_bytes": (1024, 64 << 20),
         "max_output_tokens": (1, 10_000_000), "default_output_tokens": (1, 10_000_000)},
    )
    slices = _slices(top.get("budget_slices"))
    return RoutingConfig(
        sha256=hashlib.sha256(data).hexdigest(),
        source=source,
        providers=providers,
        deployments=deployments,
        aliases=aliases,
        retries=retries,
        timeouts=timeouts,
        breaker=breaker,
        limits=limits,
        budget_slices=slices,
    )


def _slices(raw: Any) -> SlicesCfg:
    if raw is None:
        return SlicesCfg()
    w = "budget_slices"
    obj = _keys(w, raw, set(), {"enabled", "calls", "draw_window_ms", "teams", "per_call_teams", "busy_calls",
                                     "busy_window_ms", "busy_in_flight"})
    teams = obj.get("teams")
    if teams is not None:
        if not isinstance(teams, list):
            raise ConfigError(f"{w}.teams: must be a list")
        teams = frozenset(_name(f"{w}.teams", t, _TEAM) for t in teams)
    per_call = obj.get("per_call_teams", [])
    if not isinstance(per_call, list):
        raise ConfigError(f"{w}.per_call_teams: must be a list")
    return SlicesCfg(
        enabled=_bool(f"{w}.enabled", obj.get("enabled", True)),
        calls=_int(f"{w}.calls", obj.get("calls", 64), 2, 1024),
        draw_window_ms=_int(f"{w}.draw_window_ms", obj.get("draw_window_ms", 20_000), 100, 600_000),
        teams=teams,
        per_call_teams=frozenset(_name(f"{w}.per_call_teams", t, _TEAM) for t in per_call),
        busy_calls=_int(f"{w}.busy_calls", obj.get("busy_calls", 4), 1, 1_000_000),
        busy_window_ms=_int(f"{w}.busy_window_ms", obj.get("busy_window_ms", 5_000), 1, 3_600_000),
        busy_in_flight=_int(f"{w}.busy_in_flight", obj.get("busy_in_flight", 1), 1, 1_000_000),
    )


def load_config(path: Path, pinned_sha256: str = "") -> RoutingConfig:
    """Reads and validates the config file; refuses it when a pinned digest does not match."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    if pinned_sha256 and digest != pinned_sha256.lower():
        raise ConfigError(f"config digest {digest} does not match the pinned IGW_ROUTER_CONFIG_SHA256")
    return parse_config(data, str(path))
