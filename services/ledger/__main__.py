"""`python -m services.ledger`: run the ledger service until SIGTERM."""

from __future__ import annotations

from services.common.main import run_main
from services.ledger.config import Settings
from services.ledger.server import build

if __name__ == "__main__":
    run_main("ledger", Settings.from_env, lambda s: s.runtime, build)
