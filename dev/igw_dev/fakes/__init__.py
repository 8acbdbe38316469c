"""Fake LLM providers (OpenAI, Anthropic, Gemini wire formats) for tests, the demo and benchmarks.

``server`` holds the request handlers and the control API (its docstring says how the fakes
behave); each wire format has its module (``wire_openai``, ``wire_anthropic``, ``wire_gemini``),
``conversation`` decides the reply, ``common`` holds fault rules and recorded state, and
``process`` runs a fake in this event loop or as its own process.
"""

from __future__ import annotations

from .common import FAULT_MODES, KINDS, FakeState, FaultRule, base_url_for
from .process import FakeHandle, FakeProcess, start_fake
from .server import build_app

__all__ = [
    "FAULT_MODES",
    "KINDS",
    "FakeHandle",
    "FakeProcess",
    "FakeState",
    "FaultRule",
    "base_url_for",
    "build_app",
    "start_fake",
]
