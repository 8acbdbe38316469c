"""The Router's authorisation table: deny by default."""

from __future__ import annotations

from services.common.authz import OPERATORS, make_policy
from services.common.identity import Kind

AGENTS = frozenset({Kind.AGENT})

POLICY = make_policy(
    {
        "/igw.router.v1.RouterService/Generate": AGENTS,
        "/igw.router.v1.RouterService/GenerateStream": AGENTS,
        "/igw.router.v1.RouterService/GetBudget": AGENTS,
        # Operators may read the model catalogue too.
        "/igw.router.v1.RouterService/ListModels": frozenset({Kind.AGENT, Kind.OPERATOR}),
        "/igw.router.v1.RouterAdminService/*": OPERATORS,
    }
)
