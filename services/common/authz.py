"""Method-by-method authorisation: one table per service, deny by default.

A table maps a full gRPC method name (``/pkg.Service/Method``) or a whole service
(``/pkg.Service/*``) to the identity kinds allowed to call it. Methods absent from
the table are denied to everyone. Health is open to every authenticated identity;
server reflection to operators.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from services.common.identity import Kind

ALL_KINDS: frozenset[Kind] = frozenset(Kind)
OPERATORS: frozenset[Kind] = frozenset({Kind.OPERATOR})

COMMON_RULES: Mapping[str, frozenset[Kind]] = {
    "/grpc.health.v1.Health/*": ALL_KINDS,
    "/grpc.reflection.v1alpha.ServerReflection/*": OPERATORS,
    "/grpc.reflection.v1.ServerReflection/*": OPERATORS,
}


@dataclass(frozen=True)
class Policy:
    """An authorisation table; ``allowed(method)`` never raises and defaults to nobody."""

    rules: Mapping[str, frozenset[Kind]]
    _cache: dict[str, frozenset[Kind]] = field(default_factory=dict, compare=False, repr=False)

    def allowed(self, method: str) -> frozenset[Kind]:
        """The kinds that may call ``method`` (empty: nobody)."""
        hit = self._cache.get(method)
        if hit is not None:
            return hit
        kinds = self.rules.get(method)
        if kinds is None:
            service = method.rsplit("/", 1)[0]
            kinds = self.rules.get(service + "/*", frozenset())
        self._cache[method] = kinds
        return kinds


def make_policy(rules: Mapping[str, frozenset[Kind]]) -> Policy:
    """A policy of the service's rules plus the common health and reflection rules."""
    return Policy({**COMMON_RULES, **rules})
