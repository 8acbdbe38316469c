"""`python -m services.router`: run the router service until SIGTERM."""

from __future__ import annotations

from services.common.main import run_main
from services.router.config import Settings
from services.router.server import build

if __name__ == "__main__":
    run_main("router", Settings.from_env, lambda s: s.runtime, build)
