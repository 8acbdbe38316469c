"""The keyvault service's settings, read once from IGW_* variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.common.settings import RuntimeSettings


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the keyvault needs, typed and frozen."""

    runtime: RuntimeSettings

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Reads the settings (os.environ by default)."""
        e = os.environ if env is None else env
        return cls(runtime=RuntimeSettings.from_env("keyvault", e))
