"""The IssueCredential hot path's cache of each provider's ACTIVE keys.

A short in-memory cache (``key_cache_seconds``, default 5 s, at most 60 s) holding each key's
policy, its *ciphertext*, its unwrapped *data key* and its decrypted secret, per key version;
a miss is one SELECT (single-flight per provider). The cache trades at most
``key_cache_seconds`` of staleness on *other* replicas after a rotate/disable for one DB round
trip less per call; this replica drops its cache on every admin change, and every replica on
the key-change notification (``keywatch``). (Anyone able to read this process's memory also
holds the master key, so caching the data key gives them nothing.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from services.common import errors as E
from services.keyvault import crypto as C
from services.keyvault import repository as R

_LOGGER = logging.getLogger(__name__)


@dataclass(slots=True)
class CachedKey:
    """One ACTIVE key version, with what decrypting it took (filled on first use)."""

    key: R.ActiveKey
    data_key: bytes | None = None
    # The secret, decrypted once per key version (not per lease); dropped with the cache entry on
    # rotation, disable, re-wrap or seal, like the data key that decrypts it.
    plaintext: bytes | None = None

    def __repr__(self) -> str:
        return f"CachedKey(key={self.key.name!r}, version={self.key.version}, data_key=<redacted>)"

    def secret(self, master: C.MasterKey) -> bytes:
        """The key version's secret; raises ``crypto.DecryptionError`` when it does not authenticate."""
        if self.plaintext is None:
            key = self.key
            if self.data_key is None:
                self.data_key = C.unwrap_data_key(master, key.name, key.provider, key.version, key.sealed)
            self.plaintext = C.open_secret(self.data_key, key.name, key.provider, key.version, key.sealed)
        return self.plaintext


class ActiveKeyCache:
    """Each provider's ACTIVE keys for ``seconds`` (0: read the database on every call)."""

    def __init__(self, engine: AsyncEngine, seconds: float) -> None:
        self._engine = engine
        self._seconds = max(0.0, min(60.0, seconds))
        self._entries: dict[str, tuple[float, list[CachedKey]]] = {}
        self._fill_locks: dict[str, asyncio.Lock] = {}
        self._next_pick: dict[str, int] = {}

    def clear(self) -> None:
        """Drops every cached key (an admin change, a re-wrap, a seal)."""
        self._entries.clear()

    def drop(self, provider: str) -> None:
        """Drops one provider's cached keys (one of them failed to decrypt)."""
        self._entries.pop(provider, None)

    def pick(self, provider: str, eligible: list[CachedKey]) -> CachedKey:
        """Round-robin over the keys a team may use, per provider."""
        n = self._next_pick.get(provider, 0)
        self._next_pick[provider] = (n + 1) % (1 << 30)
        return eligible[n % len(eligible)]

    async def active_keys(self, provider: str) -> list[CachedKey]:
        """The provider's ACTIVE keys, from the cache or one SELECT; raises Unavailable(STORE_UNAVAILABLE)."""
        hit = self._entries.get(provider)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        lock = self._fill_locks.setdefault(provider, asyncio.Lock())
        async with lock:
            hit = self._entries.get(provider)
            if hit is not None and hit[0] > time.monotonic():
                return hit[1]
            try:
                rows = await R.active_keys(self._engine, provider)
            except Exception:
                _LOGGER.exception("cannot read provider keys")
                raise E.Unavailable("STORE_UNAVAILABLE", "the key store cannot be read") from None
            entry = [CachedKey(r) for r in rows]
            if self._seconds > 0:
                self._entries[provider] = (time.monotonic() + self._seconds, entry)
            return entry
