"""`python -m services.router`: run the router service until SIGTERM (``IGW_ROUTER_WORKERS`` > 1:
that many worker processes on one port, under a supervisor; see :mod:`services.router.workers`)."""

from __future__ import annotations

import os
import sys

from services.common.main import run_main
from services.router.config import Settings
from services.router.server import build
from services.router.workers import supervise, workers_of

if __name__ == "__main__":
    n = workers_of(os.environ)
    if n > 1:
        sys.exit(supervise(n))
    run_main("router", Settings.from_env, lambda s: s.runtime, build)
