"""Fake LLM providers (OpenAI, Anthropic, Gemini wire formats) for tests, the demo and benchmarks."""

from __future__ import annotations

from .server import FakeHandle, FakeProcess, FaultRule, base_url_for, build_app, start_fake

__all__ = ["FakeHandle", "FakeProcess", "FaultRule", "base_url_for", "build_app", "start_fake"]
