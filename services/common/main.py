"""The process entry shared by the three services: logging, build, signals, serve, exit 0."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

from services.common.logs import configure_logging
from services.common.pki import PkiError, check_not_expired
from services.common.server import ServiceRuntime
from services.common.settings import RuntimeSettings, SettingsError

_LOGGER = logging.getLogger(__name__)
S = TypeVar("S")
_GC_GEN0_THRESHOLD = 10_000


def _tune_gc() -> None:
    """Moves everything built at start-up (modules, stubs, config) out of the collector's way.

    A serving process allocates many short-lived objects per call; with the default thresholds
    the collector runs every 700 allocations and its older generations keep rescanning the
    long-lived start-up heap. Freezing that heap and collecting the young generation less often
    cuts the collector's share of each call; reference counting still frees almost everything.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_GEN0_THRESHOLD, 20, 20)


def run_main(
    service: str,
    load: Callable[[], S],
    runtime_of: Callable[[S], RuntimeSettings],
    build: Callable[[S], Awaitable[ServiceRuntime]],
) -> None:
    """Reads settings once, configures logging, serves until SIGTERM/SIGINT, exits 0."""
    try:
        settings = load()
    except SettingsError as err:
        configure_logging(service, "text")
        _LOGGER.error("bad settings: %s", err)
        sys.exit(2)
    rt = runtime_of(settings)
    configure_logging(service, rt.log_format, rt.log_level)
    try:
        check_not_expired(rt.tls_cert)
    except (PkiError, OSError) as err:
        # One clear line, then a non-zero exit: a service never serves with a bad certificate.
        _LOGGER.error("cannot serve: %s", err)
        sys.exit(2)

    async def _serve() -> None:
        runtime = await build(settings)
        runtime.install_signal_handlers()
        await runtime.start()
        _tune_gc()
        await runtime.wait()

    if os.environ.get("IGW_UVLOOP", "1") == "0":
        asyncio.run(_serve())
        return
    import uvloop

    uvloop.run(_serve())
