"""The KeyVault's authorisation table: deny by default."""

from __future__ import annotations

from services.common.authz import OPERATORS, make_policy
from services.common.identity import Kind

POLICY = make_policy(
    {
        "/igw.keyvault.v1.KeyVaultService/IssueCredential": frozenset({Kind.ROUTER}),
        "/igw.keyvault.v1.KeyVaultService/EndLease": frozenset({Kind.ROUTER}),
        "/igw.keyvault.v1.KeyVaultService/EndLeaseBatch": frozenset({Kind.ROUTER}),
        "/igw.keyvault.v1.KeyVaultAdminService/*": OPERATORS,
    }
)
