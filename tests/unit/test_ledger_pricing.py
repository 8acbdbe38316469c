"""Pricing is integer nano-dollars, each component rounded up, never floats."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.ledger.pricing import MAX_VALUE, ModelPrice, cost_nanos, default_prices, hold_nanos

SONNET = ModelPrice("claude-sonnet-4-5", 3_000_000_000, 15_000_000_000, 300_000_000)


def test_a_million_tokens_cost_exactly_the_list_price() -> None:
    assert cost_nanos(SONNET, 1_000_000, 0) == 3_000_000_000
    assert cost_nanos(SONNET, 0, 1_000_000) == 15_000_000_000
    assert cost_nanos(SONNET, 1_000_000, 0, 1_000_000) == 300_000_000


def test_every_component_rounds_up() -> None:
    cheap = ModelPrice("m", 1, 1, 1)
    assert cost_nanos(cheap, 1, 0) == 1
    assert cost_nanos(cheap, 2, 1, 1) == 3  # 1 uncached + 1 cached + 1 output, each rounds to 1
    assert cost_nanos(ModelPrice("m", 0, 0), 10**9, 10**9) == 0


def test_cached_price_zero_means_input_price() -> None:
    p = ModelPrice("m", 1_000_000, 2_000_000, 0)
    assert cost_nanos(p, 10, 0, 10) == cost_nanos(p, 10, 0, 0) == 10


def test_hold_prices_the_whole_prompt_uncached() -> None:
    assert hold_nanos(SONNET, 1000, 1000) == 3_000 * 1000 + 15_000 * 1000


def test_invalid_token_counts_are_refused() -> None:
    with pytest.raises(ValueError):
        cost_nanos(SONNET, -1, 0)
    with pytest.raises(ValueError):
        cost_nanos(SONNET, 1, 0, 2)


@given(
    st.integers(0, MAX_VALUE), st.integers(0, MAX_VALUE), st.integers(0, MAX_VALUE),
    st.integers(0, 10**12), st.integers(0, 10**12), st.integers(0, 10**12),
)
def test_cost_is_the_exact_ceiling_and_never_below_the_true_cost(
    inp: int, out: int, cached_frac: int, pin: int, pout: int, pcached: int
) -> None:
    cached = cached_frac % (inp + 1)
    price = ModelPrice("m", pin, pout, pcached)
    cost = cost_nanos(price, inp, out, cached)
    assert isinstance(cost, int)
    exact_times_million = (inp - cached) * pin + cached * (pcached or pin) + out * pout
    assert cost * 1_000_000 >= exact_times_million
    assert cost * 1_000_000 < exact_times_million + 3 * 1_000_000


def test_the_default_catalogue_is_integer_and_complete() -> None:
    prices = {p.model: p for p in default_prices()}
    for model in ("claude-opus-4-1", "claude-sonnet-4-5", "claude-haiku-4-5", "claude-3-5-haiku", "gpt-4o",
                  "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-5", "gpt-5-mini", "o3", "o4-mini",
                  "gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.0-flash", "fake-small", "fake-large"):
        assert model in prices
    assert prices["fake-small"] == ModelPrice("fake-small", 100_000_000, 400_000_000, 0)
    assert prices["fake-large"] == ModelPrice("fake-large", 3_000_000_000, 15_000_000_000, 0)
    assert all(type(v) is int for p in prices.values()
               for v in (p.input_per_mtok, p.output_per_mtok, p.cached_input_per_mtok))
