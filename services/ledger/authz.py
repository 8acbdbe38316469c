"""The Ledger's authorisation table: deny by default."""

from __future__ import annotations

from services.common.authz import OPERATORS, make_policy
from services.common.identity import Kind

ROUTER_ONLY = frozenset({Kind.ROUTER})

POLICY = make_policy(
    {
        "/igw.ledger.v1.LedgerService/Reserve": ROUTER_ONLY,
        "/igw.ledger.v1.LedgerService/Settle": ROUTER_ONLY,
        "/igw.ledger.v1.LedgerService/SettleBatch": ROUTER_ONLY,
        "/igw.ledger.v1.LedgerService/Release": ROUTER_ONLY,
        "/igw.ledger.v1.LedgerService/AcquireSlice": ROUTER_ONLY,
        "/igw.ledger.v1.LedgerService/NoteSliceDraws": ROUTER_ONLY,
        "/igw.ledger.v1.LedgerService/GetBudget": frozenset({Kind.ROUTER, Kind.OPERATOR}),
        # The router reads prices for cost routing and for the cost it reports to agents.
        "/igw.ledger.v1.LedgerAdminService/ListPrices": frozenset({Kind.ROUTER, Kind.OPERATOR}),
        "/igw.ledger.v1.LedgerAdminService/*": OPERATORS,
    }
)
