"""The sweeper: captures expired holds at their full amount, every few seconds; and, every
``maintenance`` seconds, creates the spend partitions due ahead, drops those past retention and
forgets rate events older than every window (``LedgerService.maintain``).

Safe with several ledger replicas: ``ledger_capture`` takes expired OPEN holds with
``FOR UPDATE SKIP LOCKED``, so racing sweepers split the work and each hold is captured
once. A failing sweep (database down) is logged and retried on the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from services.common import errors as E
from services.ledger.service import LedgerService

_LOGGER = logging.getLogger(__name__)


class Sweeper:
    """A background task calling ``LedgerService.sweep_once`` every ``interval`` seconds."""

    def __init__(self, service: LedgerService, interval: float, maintenance: float = 3600.0) -> None:
        self._service = service
        self._interval = interval
        self._maintenance = maintenance
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts the loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="ledger-sweeper")

    async def stop(self) -> None:
        """Cancels the loop and waits for it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        # Jitter so replicas started together do not sweep in lockstep.
        await asyncio.sleep(random.uniform(0, self._interval))
        loop = asyncio.get_running_loop()
        next_maintenance = loop.time() + self._maintenance
        while True:
            try:
                await self._service.sweep_once()
            except E.Unavailable:
                _LOGGER.warning("sweep skipped: database unavailable")
            except Exception:
                _LOGGER.exception("sweep failed")
            if loop.time() >= next_maintenance:
                next_maintenance = loop.time() + self._maintenance
                try:
                    await self._service.maintain()
                except E.Unavailable:
                    _LOGGER.warning("maintenance skipped: database unavailable")
                except Exception:
                    _LOGGER.exception("maintenance failed")
            await asyncio.sleep(self._interval)
