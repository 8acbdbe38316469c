"""The engine's provider port over HTTP: the provider adapters, sharing one pooled client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

from services.router.providers.base import ProviderAdapter
from services.router.providers.domain import ChatRequest, ChatResponse, Timeouts
from services.router.routing import Provider


class Adapters:
    """ProviderPort: the provider adapters over one shared HTTP client."""

    def __init__(self, http: httpx.AsyncClient, lookup: Callable[[str], ProviderAdapter]) -> None:
        self.http = http
        self.lookup = lookup

    def complete(
        self, provider: Provider, secret: str, chat: ChatRequest, timeouts: Timeouts,
    ) -> Awaitable[ChatResponse]:
        return self.lookup(provider.type).complete(self.http, provider.base_url, secret, chat, timeouts)

    def stream(self, provider: Provider, secret: str, chat: ChatRequest, timeouts: Timeouts) -> AsyncIterator[Any]:
        return self.lookup(provider.type).stream(self.http, provider.base_url, secret, chat, timeouts)
