"""`python -m services.keyvault`: run the keyvault service until SIGTERM."""

from __future__ import annotations

from services.common.main import run_main
from services.keyvault.config import Settings
from services.keyvault.server import build

if __name__ == "__main__":
    run_main("keyvault", Settings.from_env, lambda s: s.runtime, build)
