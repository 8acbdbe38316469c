"""Settings shared by every service, read once from ``IGW_*`` variables into a frozen object.

Each service's own ``config.py`` composes :class:`RuntimeSettings` with its own fields.
Nothing reads the environment at import time: ``from_env`` is called by ``__main__``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


class SettingsError(ValueError):
    """A setting is missing or malformed."""


def env_str(env: Mapping[str, str], name: str, default: str | None = None) -> str:
    """A string setting; raises SettingsError when required and missing."""
    value = env.get(name, default)
    if value is None or value == "":
        if default is not None:
            return default
        raise SettingsError(f"{name} is required")
    return value


def env_int(env: Mapping[str, str], name: str, default: int) -> int:
    """An integer setting."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer") from None


def env_float(env: Mapping[str, str], name: str, default: float) -> float:
    """A number setting."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number") from None


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    """A boolean setting: 1/true/yes/on or 0/false/no/off."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be a boolean")


@dataclass(frozen=True, slots=True)
class RuntimeSettings:
    """What every service needs to serve: addresses, TLS material, logging, lifecycle."""

    service: str
    listen: str
    probe_listen: str
    metrics_listen: str
    tls_cert: Path
    tls_key: Path
    tls_ca: Path
    trust_domain: str
    log_format: str
    log_level: str
    grace_seconds: float
    ready_file: Path | None
    otlp_endpoint: str
    trace_file: str
    # SO_REUSEPORT on the gRPC and probe ports: set for each of several router worker processes
    # sharing one port (IGW_ROUTER_WORKERS), never otherwise (a second process would share it).
    reuse_port: bool = False

    @classmethod
    def from_env(cls, service: str, env: Mapping[str, str] | None = None) -> RuntimeSettings:
        """Reads ``IGW_*`` variables (``os.environ`` by default)."""
        e = os.environ if env is None else env
        ready = e.get("IGW_READY_FILE")
        return cls(
            service=service,
            listen=env_str(e, "IGW_LISTEN", "127.0.0.1:0"),
            probe_listen=env_str(e, "IGW_PROBE_LISTEN", "127.0.0.1:0"),
            metrics_listen=env_str(e, "IGW_METRICS_LISTEN", "127.0.0.1:0"),
            tls_cert=Path(env_str(e, "IGW_TLS_CERT")),
            tls_key=Path(env_str(e, "IGW_TLS_KEY")),
            tls_ca=Path(env_str(e, "IGW_TLS_CA")),
            trust_domain=env_str(e, "IGW_TRUST_DOMAIN", "igw.local"),
            log_format=env_str(e, "IGW_LOG_FORMAT", "json"),
            log_level=env_str(e, "IGW_LOG_LEVEL", "INFO"),
            grace_seconds=env_float(e, "IGW_GRACE_SECONDS", 10.0),
            ready_file=Path(ready) if ready else None,
            otlp_endpoint=e.get("IGW_OTLP_ENDPOINT", ""),
            trace_file=e.get("IGW_TRACE_FILE", ""),
            reuse_port=env_bool(e, "IGW_REUSE_PORT", False),
        )
