"""The sweeper: captures expired holds at their full amount, every few seconds.

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

    def __init__(self, service: LedgerService, interval: float) -> None:
        self._service = service
        self._interval = interval
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
        while True:
            try:
                await self._service.sweep_once()
            except E.Unavailable:
                _LOGGER.warning("sweep skipped: database unavailable")
            except Exception:
                _LOGGER.exception("sweep failed")
            await asyncio.sleep(self._interval)
