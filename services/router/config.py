"""The router's settings, read once from IGW_* variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.common.settings import RuntimeSettings, env_bool, env_int, env_str


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
        )
