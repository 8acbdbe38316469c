"""The provider registry: one place that maps a provider kind to its adapter.

The adapters import the shared machinery in ``base``; only this module imports the adapters, so the
package has no import circle.
"""

from __future__ import annotations

from collections.abc import Callable

from .anthropic import AnthropicAdapter
from .base import ProviderAdapter
from .gemini import GeminiAdapter
from .openai import OpenAIAdapter

__all__ = ["KINDS", "get_adapter"]

#: Provider kinds a routing config may name, each with its adapter's constructor.
_FACTORIES: dict[str, Callable[[], ProviderAdapter]] = {
    "openai": lambda: OpenAIAdapter("openai"),
    "openai_compatible": lambda: OpenAIAdapter("openai_compatible"),
    "anthropic": AnthropicAdapter,
    "gemini": GeminiAdapter,
}
KINDS = frozenset(_FACTORIES)


def get_adapter(kind: str) -> ProviderAdapter:
    """Return the adapter for ``kind``: openai, openai_compatible, anthropic or gemini."""
    try:
        factory = _FACTORIES[kind]
    except KeyError:
        raise ValueError("unknown provider kind") from None
    return factory()
