"""KeyVault settings: lease lifetimes are capped by a hard limit of one minute."""

from __future__ import annotations

import base64
import datetime as dt
import os

import pytest

from services.common.settings import SettingsError
from services.keyvault.config import MAX_LEASE_TTL_SECONDS, Settings

BASE = {
    "IGW_DATABASE_URL": "postgresql+psycopg://u@127.0.0.1:1/vault",
    "IGW_VAULT_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
    "IGW_TLS_CERT": "/nonexistent/keyvault.pem",
    "IGW_TLS_KEY": "/nonexistent/keyvault-key.pem",
    "IGW_TLS_CA": "/nonexistent/ca.pem",
}


def test_the_hard_limit_is_one_minute() -> None:
    assert MAX_LEASE_TTL_SECONDS == 60


def test_defaults_are_within_the_limit() -> None:
    s = Settings.from_env(BASE)
    assert (s.lease_ttl_seconds, s.lease_max_ttl_seconds) == (30, 60)


@pytest.mark.parametrize("value", ["61", "300", "3600", "0", "-1"])
def test_a_max_ttl_outside_1_to_60_seconds_is_refused(value: str) -> None:
    with pytest.raises(SettingsError, match="IGW_VAULT_LEASE_MAX_TTL_SECONDS must be between 1 and 60"):
        Settings.from_env({**BASE, "IGW_VAULT_LEASE_MAX_TTL_SECONDS": value})


@pytest.mark.parametrize("value", ["61", "0"])
def test_a_default_ttl_outside_1_to_60_seconds_is_refused(value: str) -> None:
    with pytest.raises(SettingsError, match="IGW_VAULT_LEASE_TTL_SECONDS must be between 1 and 60"):
        Settings.from_env({**BASE, "IGW_VAULT_LEASE_TTL_SECONDS": value})


def test_the_limit_itself_and_shorter_caps_are_accepted() -> None:
    assert Settings.from_env({**BASE, "IGW_VAULT_LEASE_MAX_TTL_SECONDS": "60"}).lease_max_ttl_seconds == 60
    s = Settings.from_env({**BASE, "IGW_VAULT_LEASE_MAX_TTL_SECONDS": "10"})
    assert (s.lease_ttl_seconds, s.lease_max_ttl_seconds) == (10, 10)


def test_settings_built_directly_are_checked_too() -> None:
    s = Settings.from_env(BASE)
    with pytest.raises(SettingsError):
        Settings(runtime=s.runtime, database_url=s.database_url, master_key=None, master_key_problem="x",
                 lease_max_ttl_seconds=600)


def test_the_service_clamps_to_the_limit_even_without_settings() -> None:
    from services.keyvault.service import VaultService

    svc = VaultService(None, None, None, None, lease_ttl=dt.timedelta(hours=1),  # type: ignore[arg-type]
                       lease_max_ttl=dt.timedelta(hours=1))
    assert svc._lease_max_ttl == svc._lease_ttl == dt.timedelta(seconds=60)
