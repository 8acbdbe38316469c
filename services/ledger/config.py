"""The ledger service's settings, read once from IGW_* variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.common.settings import RuntimeSettings, SettingsError, env_bool, env_float, env_int, env_str

MAX_HOLD_TTL_SECONDS = 3600
# The most calls one budget slice (AcquireSlice) may cover.
MAX_SLICE_CALLS = 1024


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    """The ledger's own settings (no runtime/TLS), so tests can build a service directly."""

    database_url: str
    hold_ttl_seconds: int = 300
    sweep_interval_seconds: float = 5.0
    pool_size: int = 20
    migrate: bool = True
    db_timeout_seconds: float = 2.0
    # Spend partitions (one a month) kept created ahead of now; whole partitions older than the
    # retention are dropped (0: keep forever). Maintenance runs on start and every interval.
    partitions_ahead_months: int = 3
    retention_days: int = 0
    maintenance_interval_seconds: float = 3600.0
    # False (the default): a team (and agent) no budget applies to is refused with NO_BUDGET.
    allow_unbudgeted: bool = False

    @classmethod
    def from_env(cls, e: Mapping[str, str]) -> LedgerSettings:
        """Reads IGW_DATABASE_URL and IGW_LEDGER_*; validates ranges."""
        ttl = env_int(e, "IGW_LEDGER_HOLD_TTL_SECONDS", 300)
        if not 1 <= ttl <= MAX_HOLD_TTL_SECONDS:
            raise SettingsError(f"IGW_LEDGER_HOLD_TTL_SECONDS must be between 1 and {MAX_HOLD_TTL_SECONDS}")
        sweep = env_float(e, "IGW_LEDGER_SWEEP_INTERVAL_SECONDS", 5.0)
        if not 0.05 <= sweep <= 3600:
            raise SettingsError("IGW_LEDGER_SWEEP_INTERVAL_SECONDS must be between 0.05 and 3600")
        pool = env_int(e, "IGW_LEDGER_POOL_SIZE", 20)
        if not 1 <= pool <= 500:
            raise SettingsError("IGW_LEDGER_POOL_SIZE must be between 1 and 500")
        timeout = env_float(e, "IGW_LEDGER_DB_TIMEOUT_SECONDS", 2.0)
        if not 0.1 <= timeout <= 60:
            raise SettingsError("IGW_LEDGER_DB_TIMEOUT_SECONDS must be between 0.1 and 60")
        ahead = env_int(e, "IGW_LEDGER_PARTITIONS_AHEAD_MONTHS", 3)
        if not 1 <= ahead <= 24:
            raise SettingsError("IGW_LEDGER_PARTITIONS_AHEAD_MONTHS must be between 1 and 24")
        retention = env_int(e, "IGW_LEDGER_RETENTION_DAYS", 0)
        if retention != 0 and not 31 <= retention <= 36500:
            raise SettingsError("IGW_LEDGER_RETENTION_DAYS must be 0 (keep forever) or between 31 and 36500")
        maint = env_float(e, "IGW_LEDGER_MAINTENANCE_INTERVAL_SECONDS", 3600.0)
        if not 1 <= maint <= 86400:
            raise SettingsError("IGW_LEDGER_MAINTENANCE_INTERVAL_SECONDS must be between 1 and 86400")
        return cls(
            partitions_ahead_months=ahead,
            retention_days=retention,
            maintenance_interval_seconds=maint,
            database_url=env_str(e, "IGW_DATABASE_URL"),
            hold_ttl_seconds=ttl,
            sweep_interval_seconds=sweep,
            pool_size=pool,
            migrate=env_bool(e, "IGW_LEDGER_MIGRATE", True),
            db_timeout_seconds=timeout,
            allow_unbudgeted=env_bool(e, "IGW_LEDGER_ALLOW_UNBUDGETED", False),
        )


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the ledger process needs, typed and frozen."""

    runtime: RuntimeSettings
    ledger: LedgerSettings

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Reads the settings (os.environ by default)."""
        e = os.environ if env is None else env
        return cls(runtime=RuntimeSettings.from_env("ledger", e), ledger=LedgerSettings.from_env(e))
