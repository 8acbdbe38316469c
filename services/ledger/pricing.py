"""Pricing: integer nano-dollars only, every component rounded up.

Prices are nano-dollars (1e-9 USD) per million tokens. The cost of a call is::

    ceil((input - cached) * input_price / 1e6)
  + ceil(cached * (cached_price or input_price) / 1e6)
  + ceil(output * output_price / 1e6)

computed with Python ints (arbitrary precision), never floats. The same formula runs
inside Postgres (``ledger_cost``, numeric arithmetic) on the hot path; the tests check
that both agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from services.common.money import call_cost

PER = 1_000_000
# The largest token count, price or amount the ledger accepts (well inside int64).
MAX_VALUE = 2**62


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Nano-dollars per million tokens for one model; cached 0 means the input price."""

    model: str
    input_per_mtok: int
    output_per_mtok: int
    cached_input_per_mtok: int = 0


def cost_nanos(price: ModelPrice, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> int:
    """The cost of a call in nano-dollars, each component rounded up (the router uses the same function)."""
    if min(input_tokens, output_tokens, cached_input_tokens) < 0:
        raise ValueError("token counts must be >= 0")
    if cached_input_tokens > input_tokens:
        raise ValueError("cached input tokens cannot exceed input tokens")
    return call_cost(input_tokens, output_tokens, cached_input_tokens, price.input_per_mtok,
                     price.output_per_mtok, price.cached_input_per_mtok)


def hold_nanos(price: ModelPrice, prompt_tokens_upper_bound: int, max_output_tokens: int) -> int:
    """The most a call can cost: the whole prompt at the input price plus every output token."""
    return cost_nanos(price, prompt_tokens_upper_bound, max_output_tokens, 0)


def default_prices() -> list[ModelPrice]:
    """The shipped catalogue (``default_prices.json``), validated."""
    raw = json.loads(resources.files("services.ledger").joinpath("default_prices.json").read_text())
    out: list[ModelPrice] = []
    for item in raw["prices"]:
        values = (item["input"], item["output"], item.get("cached", 0))
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_VALUE for v in values):
            raise ValueError(f"bad price for {item.get('model')!r}: integers in [0, 2**62] required")
        out.append(ModelPrice(item["model"], *values))
    return out
