"""Money: integer nano-dollars (1e-9 USD); prices in nano-dollars per million tokens.

Each component is rounded up on its own, so a call is never under-charged:
``cost = ceil(uncached_in * p_in / 1e6) + ceil(cached * p_cached / 1e6) + ceil(out * p_out / 1e6)``.
No float anywhere.
"""

from __future__ import annotations

from decimal import Decimal

NANOS_PER_DOLLAR = 1_000_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000


def ceil_div(a: int, b: int) -> int:
    """Integer ceiling division for non-negative a and positive b."""
    return -(-a // b)


def component_cost(tokens: int, price_per_mtok: int) -> int:
    """Nano-dollars for ``tokens`` at ``price_per_mtok`` nano-dollars per million, rounded up."""
    return ceil_div(tokens * price_per_mtok, TOKENS_PER_PRICE_UNIT)


def call_cost(
    input_tokens: int,
    output_tokens: int,
    cached_input_tokens: int,
    input_price: int,
    output_price: int,
    cached_input_price: int,
) -> int:
    """The cost of one call; ``cached_input_price`` 0 means the input price."""
    cached = min(cached_input_tokens, input_tokens)
    cached_price = cached_input_price or input_price
    return (
        component_cost(input_tokens - cached, input_price)
        + component_cost(cached, cached_price)
        + component_cost(output_tokens, output_price)
    )


def dollars(nanos: int) -> str:
    """Nano-dollars as a dollar string, e.g. ``$0.000123``."""
    return f"${(Decimal(nanos) / NANOS_PER_DOLLAR).normalize():f}"
