"""The committed attempt of a streaming call: its events relayed to the agent, then settled.

A stream cut short (the agent left, the provider broke off) is still settled, before the
upstream is closed, with what was consumed: the provider's counts where it gave them, never
less than what the agent was sent.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from services.common import errors as E
from services.common.tracing import attempt_failed, attempt_usage, end_span
from services.router.call.domain import Lease, Settled, Started, StreamEvent
from services.router.providers.base import estimate_tokens
from services.router.providers.domain import (
    FinishReason,
    StreamEnd,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
    UsageSoFar,
)
from services.router.providers.errors import ProviderError
from services.router.routing import Deployment

if TYPE_CHECKING:
    from services.router.call.engine import Run


async def relay(
    run: Run, dep: Deployment, lease: Lease, upstream: AsyncIterator[Any], first: Any,
    t0: float, span: Any, so_far: Usage | None = None,
) -> AsyncIterator[StreamEvent]:
    """Relays the committed attempt's events; ends its span (``span``) when the stream does.

    ``so_far`` (and any later ``UsageSoFar``) is what the provider reported before its final
    usage: a stream cut short is charged with the provider's counts where it gave them."""
    text_parts: list[str] = []
    calls: dict[int, list[str]] = {}
    usage: Usage | None = None
    finish = FinishReason.OTHER
    outcome = Settled.CANCELLED
    try:
        yield Started(run.call.request_id, dep)
        event = first
        while True:
            if isinstance(event, TextDelta):
                text_parts.append(event.text)
                yield event
            elif isinstance(event, ToolCallDelta):
                slot = calls.setdefault(event.index, [event.id, event.name, ""])
                if event.id:
                    slot[0] = event.id
                if event.name:
                    slot[1] = event.name
                slot[2] += event.arguments_fragment
                yield event
            elif isinstance(event, UsageSoFar):
                so_far = event.usage
            elif isinstance(event, StreamEnd):
                usage, finish = event.usage, event.finish_reason
            try:
                event = await upstream.__anext__()
            except StopAsyncIteration:
                break
        outcome = Settled.SUCCESS
    except ProviderError as err:
        outcome = Settled.PROVIDER_ERROR
        raise E.Unavailable("UPSTREAM_STREAM_BROKEN", f"the provider's stream broke ({err.kind.value})",
                            {"deployment": dep.name}) from None
    finally:
        elapsed = run.clock.perf_counter() - t0
        if usage is None or outcome != Settled.SUCCESS:
            # No final usage (hang-up, broken stream): count what was consumed; never less than
            # seen. Input: the provider's count when it gave one, else the upper bound.
            known = usage or so_far
            usage = Usage(
                input_tokens=run.call.prep.prompt_tokens_upper_bound if known is None else known.input_tokens,
                output_tokens=max(estimate_tokens("".join(text_parts))
                                  + sum(estimate_tokens(c[2]) for c in calls.values()),
                                  known.output_tokens if known else 0),
                cached_input_tokens=0 if known is None else known.cached_input_tokens,
                reported=False,
            )
        run.metrics.upstream_seconds.labels(dep.provider, dep.model).observe(elapsed)
        # Settle before closing upstream: a second cancellation during the close must not skip it.
        run.settle(lease, dep, usage, elapsed, outcome)
        attempt_usage(span, usage.input_tokens, usage.output_tokens)
        if outcome == Settled.PROVIDER_ERROR:
            attempt_failed(span, "stream_broken")
        end_span(span)
        await aclose(upstream)
    tool_calls = [ToolCall(c[0], c[1], c[2]) for _, c in sorted(calls.items())]
    yield await run.result(dep, lease, "".join(text_parts), tool_calls, finish, usage)


async def aclose(gen: Any) -> None:
    """Closes an upstream stream, whatever it raises."""
    with contextlib.suppress(Exception):
        await gen.aclose()
