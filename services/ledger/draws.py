"""NoteSliceDraws: a router records which calls it drew from its budget slices.

A call drawn from a slice is answered once its draw is recorded here; its settle follows in the
background. If the router dies, the sweeper's capture of the expired slice writes one entry per
recorded draw that was never settled, under the call's own request id (``ledger_capture``), so
every answered call has exactly one spend entry. A draw is forgotten when the router withdraws
it (the call ended without spending) or when its slice is released or captured.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from services.common import errors as E
from services.ledger import domain as D
from services.ledger.ledger_metrics import Clock, LedgerMetrics
from services.ledger.repository import DrawArgs, Repository
from services.ledger.results import DrawOutcome

_LOGGER = logging.getLogger("services.ledger.service")

# Draws per NoteSliceDraws call.
MAX_DRAWS = 1024

_REFUSALS: dict[DrawOutcome, E.IgwError] = {
    DrawOutcome.NOT_FOUND: E.NotFound("SLICE_NOT_FOUND", "no budget slice has this reservation_id"),
    DrawOutcome.NOT_A_SLICE: E.FailedPrecondition("NOT_A_SLICE", "the reservation is a call's hold, not a slice"),
    DrawOutcome.SLICE_CLOSED: E.FailedPrecondition(
        "SLICE_CLOSED", "the slice was already released or captured: the draw was not recorded"),
}


class DrawUseCases:
    """NoteSliceDraws (mixed into :class:`~services.ledger.service.LedgerService`)."""

    repo: Repository
    metrics: LedgerMetrics
    now: Clock

    @staticmethod
    def draw_args(reservation_id: str, request_id: str, held_nanos: int, withdrawn: bool) -> DrawArgs:
        """Validates one draw (raises InvalidArgument)."""
        return DrawArgs(D.check_reservation_id(reservation_id), D.check_request_id(request_id),
                        D.check_amount("held_nanos", held_nanos), withdrawn)

    async def note_draws(self, items: Sequence[DrawArgs | E.IgwError]) -> list[E.IgwError | bool]:
        """Records (or withdraws) the valid draws in one transaction; per item whether a budget
        the slice counts against is over its limit (recorded either way), or the refusal (an
        invalid item's own error is passed through)."""
        valid = [a for a in items if not isinstance(a, E.IgwError)]
        outcomes = iter(await self.repo.note_draws(valid, self.now()) if valid else [])
        out: list[E.IgwError | bool] = []
        for item in items:
            if isinstance(item, E.IgwError):
                self.metrics.slice_draws.labels("invalid").inc()
                out.append(item)
                continue
            outcome = next(outcomes)
            self.metrics.slice_draws.labels(outcome.name.lower()).inc()
            if outcome is DrawOutcome.NOTED or outcome is DrawOutcome.NOTED_OVER_LIMIT:
                out.append(outcome is DrawOutcome.NOTED_OVER_LIMIT)
                continue
            if outcome is DrawOutcome.SLICE_CLOSED:
                _LOGGER.warning("a draw arrived after its slice closed; its settle will be charged on top",
                                extra={"reservation_id": str(item.reservation_id)})
            out.append(_REFUSALS[outcome])
        return out
