"""The router's settings, read once from IGW_* variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.common.settings import RuntimeSettings, env_bool, env_float, env_int, env_str


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the router needs, typed and frozen."""

    runtime: RuntimeSettings
    config_path: Path
    config_sha256: str
    ledger_addr: str
    keyvault_addr: str
    lease_ttl_seconds: int
    max_connections: int
    access_log: bool
    # The HTTPS edge (OpenAI/Anthropic-compatible); off when http_listen is empty.
    http_listen: str = ""
    http_handshake_timeout_s: float = 10.0
    http_idle_timeout_s: float = 30.0
    http_body_timeout_s: float = 60.0
    http_write_timeout_s: float = 60.0
    http_max_connections: int = 1024
    http_max_body_bytes: int = 16 * 1024 * 1024

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Reads the settings (os.environ by default)."""
        e = os.environ if env is None else env
        return cls(
            runtime=RuntimeSettings.from_env("router", e),
            config_path=Path(env_str(e, "IGW_ROUTER_CONFIG")),
            config_sha256=e.get("IGW_ROUTER_CONFIG_SHA256", "").strip().lower(),
            ledger_addr=env_str(e, "IGW_LEDGER_ADDR"),
            keyvault_addr=env_str(e, "IGW_KEYVAULT_ADDR"),
            lease_ttl_seconds=env_int(e, "IGW_ROUTER_LEASE_TTL_SECONDS", 30),
            max_connections=env_int(e, "IGW_ROUTER_MAX_CONNECTIONS", 1024),
            access_log=env_bool(e, "IGW_ACCESS_LOG", True),
            http_listen=e.get("IGW_ROUTER_HTTP_LISTEN", "").strip(),
            http_handshake_timeout_s=env_float(e, "IGW_ROUTER_HTTP_HANDSHAKE_TIMEOUT_SECONDS", 10.0),
            http_idle_timeout_s=env_float(e, "IGW_ROUTER_HTTP_IDLE_TIMEOUT_SECONDS", 30.0),
            http_body_timeout_s=env_float(e, "IGW_ROUTER_HTTP_BODY_TIMEOUT_SECONDS", 60.0),
            http_write_timeout_s=env_float(e, "IGW_ROUTER_HTTP_WRITE_TIMEOUT_SECONDS", 60.0),
            http_max_connections=env_int(e, "IGW_ROUTER_HTTP_MAX_CONNECTIONS", 1024),
            http_max_body_bytes=env_int(e, "IGW_ROUTER_HTTP_MAX_BODY_BYTES", 16 * 1024 * 1024),
        )
