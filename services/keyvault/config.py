"""The keyvault service's settings, read once from IGW_* variables.

=================================  =========  ==================================================
variable                           default    meaning
=================================  =========  ==================================================
IGW_DATABASE_URL                   required   the vault's own Postgres (never the ledger's)
IGW_VAULT_MASTER_KEY               -          base64 of exactly 32 bytes
IGW_VAULT_MASTER_KEY_FILE          -          a file holding the same (used if the above is unset)
IGW_VAULT_LEASE_TTL_SECONDS        30         lease lifetime when the router asks for none
IGW_VAULT_LEASE_MAX_TTL_SECONDS    60         cap on any requested lifetime; at most 60
                                              (``MAX_LEASE_TTL_SECONDS``, a hard limit)
IGW_VAULT_GRACE_SECONDS            3600       default grace of the previous version on rotation
IGW_VAULT_KEY_CACHE_SECONDS        5          how long unwrapped data keys + ciphertexts are
                                              cached per provider (0 = off, at most 60)
IGW_VAULT_MIGRATE                  true       run the vault's alembic migrations at start
IGW_VAULT_AUDIT_LOCK_TIMEOUT_MS    2000       give up on an audit batch after waiting this long
=================================  =========  ==================================================

Leases live "a few seconds to a minute" (issue 4; DESIGN: "seconds, not minutes"), so the
lease lifetimes are refused above one minute rather than silently clamped: a deployment that
asks for longer has misunderstood what a lease is for, and should hear so at start.

A bad master key is *not* a settings error: the vault starts sealed (NOT_SERVING) so the
orchestrator sees a live process that clearly says what is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.common.settings import RuntimeSettings, SettingsError, env_bool, env_int, env_str
from services.keyvault.crypto import MasterKey, MasterKeyError, load_master_key
from services.keyvault.domain import MAX_LEASE_TTL_SECONDS

__all__ = ["MAX_LEASE_TTL_SECONDS", "Settings"]


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the keyvault needs, typed and frozen. The master key never shows in repr."""

    runtime: RuntimeSettings
    database_url: str = field(repr=False)
    master_key: MasterKey | None = field(repr=False)
    master_key_problem: str
    lease_ttl_seconds: int = 30
    lease_max_ttl_seconds: int = 60
    grace_seconds: int = 3600
    key_cache_seconds: float = 5.0
    migrate: bool = True
    audit_lock_timeout_ms: int = 2000

    def __post_init__(self) -> None:
        # Also guards Settings built directly (tests, embedding), not only from_env.
        _check_ttls(self.lease_ttl_seconds, self.lease_max_ttl_seconds)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Reads the settings (os.environ by default)."""
        e = os.environ if env is None else env
        try:
            master: MasterKey | None = load_master_key(e)
            problem = ""
        except MasterKeyError as err:
            master, problem = None, str(err)
        ttl = env_int(e, "IGW_VAULT_LEASE_TTL_SECONDS", 30)
        max_ttl = env_int(e, "IGW_VAULT_LEASE_MAX_TTL_SECONDS", 60)
        _check_ttls(ttl, max_ttl)
        cache = env_int(e, "IGW_VAULT_KEY_CACHE_SECONDS", 5)
        if not 0 <= cache <= 60:
            raise SettingsError("IGW_VAULT_KEY_CACHE_SECONDS must be between 0 and 60")
        grace = env_int(e, "IGW_VAULT_GRACE_SECONDS", 3600)
        if grace < 0:
            raise SettingsError("IGW_VAULT_GRACE_SECONDS must be >= 0")
        return cls(
            runtime=RuntimeSettings.from_env("keyvault", e),
            database_url=env_str(e, "IGW_DATABASE_URL"),
            master_key=master,
            master_key_problem=problem,
            lease_ttl_seconds=min(ttl, max_ttl),
            lease_max_ttl_seconds=max_ttl,
            grace_seconds=grace,
            key_cache_seconds=float(cache),
            migrate=env_bool(e, "IGW_VAULT_MIGRATE", True),
            audit_lock_timeout_ms=env_int(e, "IGW_VAULT_AUDIT_LOCK_TIMEOUT_MS", 2000),
        )


def _check_ttls(ttl: int, max_ttl: int) -> None:
    for name, value in (("IGW_VAULT_LEASE_TTL_SECONDS", ttl), ("IGW_VAULT_LEASE_MAX_TTL_SECONDS", max_ttl)):
        if not 0 < value <= MAX_LEASE_TTL_SECONDS:
            raise SettingsError(f"{name} must be between 1 and {MAX_LEASE_TTL_SECONDS} seconds")
