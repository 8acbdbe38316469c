"""The router's settings, read once from IGW_* variables, and where its routing config comes from."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.common.settings import RuntimeSettings, SettingsError, env_bool, env_float, env_int, env_str
from services.router.routing import ConfigError, RoutingConfig, load_config


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
    config_sha256_file: Path | None = None
    config_watch_seconds: float = 2.0
    ledger_id: str = ""
    keyvault_id: str = ""
    # How a ledger or vault replica's identity is checked (services/router/upstream_tls.py).
    upstream_identity: str = "auto"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Reads the settings (os.environ by default)."""
        e = os.environ if env is None else env
        runtime = RuntimeSettings.from_env("router", e)
        td = runtime.trust_domain
        pin_file = e.get("IGW_ROUTER_CONFIG_SHA256_FILE", "").strip()
        upstream_identity = e.get("IGW_ROUTER_UPSTREAM_IDENTITY", "auto").strip().lower() or "auto"
        if upstream_identity not in ("auto", "uri"):
            raise SettingsError("IGW_ROUTER_UPSTREAM_IDENTITY must be auto or uri")
        return cls(
            runtime=runtime,
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
            config_sha256_file=Path(pin_file) if pin_file else None,
            config_watch_seconds=env_float(e, "IGW_ROUTER_CONFIG_WATCH_SECONDS", 2.0),
            ledger_id=env_str(e, "IGW_LEDGER_SPIFFE_ID", f"spiffe://{td}/ledger"),
            keyvault_id=env_str(e, "IGW_KEYVAULT_SPIFFE_ID", f"spiffe://{td}/keyvault"),
            upstream_identity=upstream_identity,
        )


def _stamp(path: Path | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = path.stat()  # follows symlinks: a ConfigMap update swaps the `..data` link
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


@dataclass
class ConfigSource:
    """The routing-config file and its digest pin (an env value, or a file updated alongside it).

    The pin file holds the hex SHA-256, optionally followed by anything (``sha256sum`` output works).
    """

    path: Path
    pinned_env: str = ""
    pin_file: Path | None = None
    current_pin: str = field(default="", init=False)

    def pin(self) -> str:
        """The digest the config must match now ('' when nothing is pinned)."""
        if self.pin_file is None:
            return self.pinned_env
        try:
            text = self.pin_file.read_text().strip()
        except OSError as err:
            raise ConfigError(f"cannot read the digest pin file {self.pin_file}: {err.strerror}") from None
        token = text.split()[0].lower() if text else ""
        if len(token) != 64 or any(c not in "0123456789abcdef" for c in token):
            raise ConfigError(f"the digest pin file {self.pin_file} holds no SHA-256")
        return token

    def load(self) -> RoutingConfig:
        """Reads, checks against the pin, validates; raises ConfigError."""
        pin = self.pin()
        cfg = load_config(self.path, pin)
        self.current_pin = pin
        return cfg

    def stamps(self) -> tuple[object, ...]:
        """Changes whenever the config file or the pin file changes on disk."""
        return _stamp(self.path), _stamp(self.pin_file)


def sha256_of(data: bytes) -> str:
    """Hex SHA-256 (what the pin holds)."""
    return hashlib.sha256(data).hexdigest()
