"""The ledger's reads over spend (totals, entries) and the price catalogue (with SetPrices)."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Sequence

from services.common import errors as E
from services.ledger import domain as D
from services.ledger.ledger_metrics import Clock, LedgerMetrics
from services.ledger.page_tokens import bad_token, bounded_page_size, decode_parts, decode_token, encode_parts
from services.ledger.pricing import ModelPrice
from services.ledger.repository import Repository

_MISMATCH = "IDEMPOTENCY_MISMATCH"

_LOGGER = logging.getLogger("services.ledger.service")


class SpendUseCases:
    """Spend reports and prices (mixed into :class:`~services.ledger.service.LedgerService`)."""

    repo: Repository
    metrics: LedgerMetrics
    now: Clock

    async def list_spend(
        self,
        *,
        start: dt.datetime | None,
        end: dt.datetime | None,
        group_by: Sequence[str],
        team: str = "",
        run: str = "",
    ) -> list[D.SpendTotal]:
        """The first page (up to 10,000 groups) of :meth:`list_spend_page`."""
        totals, _ = await self.list_spend_page(
            start=start, end=end, group_by=group_by, team=team, run=run, page_size=10000)
        return totals

    async def list_spend_page(
        self,
        *,
        start: dt.datetime | None,
        end: dt.datetime | None,
        group_by: Sequence[str],
        team: str = "",
        run: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[D.SpendTotal], str]:
        """Totals grouped by team/agent/model/provider/day/run over [start, end), paged; returns
        (totals, next_page_token). Whole hours are read from the hourly rollup."""
        D.check_principal("team", team, required=False)
        D.check_name("run", run, required=False)
        if run and not team:
            raise E.InvalidArgument("MISSING_FIELD", "a run filter needs the team", {"field": "team"})
        size = bounded_page_size(page_size, 1000, 10000)
        offset = 0
        if page_token:
            try:
                offset = int(decode_parts(page_token, 1)[0])
            except ValueError:
                raise bad_token() from None
            if offset < 0:
                raise bad_token()
        now = self.now()
        end = end or now
        start = start or (end - dt.timedelta(days=30))
        if start > end:
            raise E.InvalidArgument("INVALID_TIME_RANGE", "start_time is after end_time", {})
        rows = await self.repo.list_spend(start, end, list(dict.fromkeys(group_by)), team, run, size + 1, offset)
        token = encode_parts(str(offset + size)) if len(rows) > size else ""
        return rows[:size], token

    async def list_entries(
        self,
        *,
        team: str = "",
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[D.SpendEntry], str]:
        """Entries newest first; returns (entries, next_page_token)."""
        D.check_principal("team", team, required=False)
        if page_size < 0:
            raise E.InvalidArgument("INVALID_PAGE_SIZE", "page_size must be >= 0", {"field": "page_size"})
        size = min(page_size or 100, 1000)
        before = decode_token(page_token) if page_token else None
        found = await self.repo.list_entries(team, start, end, size + 1, before)
        entries = found[:size]
        token = ""
        if len(found) > size and entries:
            last = entries[-1]
            token = f"{D.to_us(last.created_at)}.{last.id}"
        return entries, token

    async def set_prices(
        self, *, request_id: str, prices: Sequence[ModelPrice], remove_models: Sequence[str]
    ) -> int:
        """Creates a new catalogue version from the current one plus the changes."""
        D.check_request_id(request_id)
        seen: set[str] = set()
        for p in prices:
            D.check_name("model", p.model)
            if p.model in seen:
                raise E.InvalidArgument("DUPLICATE_MODEL", f"model {p.model} appears twice", {"model": p.model})
            seen.add(p.model)
            D.check_amount("input_per_mtok_nanos", p.input_per_mtok)
            D.check_amount("output_per_mtok_nanos", p.output_per_mtok)
            D.check_amount("cached_input_per_mtok_nanos", p.cached_input_per_mtok)
        for m in remove_models:
            D.check_name("remove_models", m)
            if m in seen:
                raise E.InvalidArgument("DUPLICATE_MODEL", f"model {m} is both set and removed", {"model": m})
        if not prices and not remove_models:
            raise E.InvalidArgument("MISSING_FIELD", "prices or remove_models is required", {"field": "prices"})
        digest = hashlib.sha256(
            repr(
                (
                    sorted((p.model, p.input_per_mtok, p.output_per_mtok, p.cached_input_per_mtok) for p in prices),
                    sorted(remove_models),
                )
            ).encode()
        ).hexdigest()
        created = await self.repo.set_prices(request_id, digest, list(prices), list(remove_models), self.now())
        if created is None:
            raise E.Aborted(_MISMATCH, "this request_id created a different price version", {"request_id": request_id})
        version, replayed = created
        if not replayed:
            _LOGGER.info("price catalogue version %d created", version)
        return version

    async def list_prices(self, *, version: int = 0, page_size: int = 0, page_token: str = "") -> D.PriceList:
        """One catalogue version (0 = current), by model name; paged when ``page_size`` is set."""
        if version < 0:
            raise E.InvalidArgument("INVALID_VERSION", "version must be >= 0", {"field": "version"})
        if page_size < 0:
            raise E.InvalidArgument("INVALID_PAGE_SIZE", "page_size must be >= 0", {"field": "page_size"})
        after = decode_parts(page_token, 1)[0] if page_token else None
        catalogue = await self.repo.list_prices(version)
        if catalogue is None:
            raise E.NotFound("PRICE_VERSION_NOT_FOUND", "no such price catalogue version", {"version": version})
        found_version, created_at, all_prices = catalogue
        prices = [p for p in all_prices if after is None or p[0] > after]
        size = min(page_size, 10000) if page_size else len(prices)
        token = encode_parts(prices[size - 1][0]) if len(prices) > size else ""
        return D.PriceList(found_version, created_at, prices[:size], token)
