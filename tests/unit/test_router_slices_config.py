"""The routing config's budget_slices section: on by default, per-call holds as a choice."""

from __future__ import annotations

import pytest

from services.router.routing import ConfigError, parse_config

BASE = b"""
providers:
  p: {type: openai, base_url: "http://127.0.0.1:9/v1", local: true}
deployments:
  d: {provider: p, model: m, price: m}
models:
  m: {candidates: [d]}
"""


def test_slices_are_the_default_for_every_team_and_one_line_turns_them_off() -> None:
    # On by default: a slice-held call is answered only once its spend entry is durable, so a
    # router killed -9 loses no entries (see docs/operations.md).
    default = parse_config(BASE).budget_slices
    assert default.enabled and (default.calls, default.draw_window_ms) == (64, 20_000)
    assert default.applies("any-team") and default.applies("another")
    assert (default.busy_calls, default.busy_window_ms, default.busy_in_flight) == (4, 5_000, 1)
    off = parse_config(BASE + b"budget_slices: {enabled: false}\n").budget_slices
    assert not off.enabled and not off.applies("any-team")


def test_per_call_holds_for_every_team_or_for_some() -> None:
    assert not parse_config(BASE + b"budget_slices: {enabled: false}\n").budget_slices.applies("t")
    cfg = parse_config(BASE + b"budget_slices: {enabled: true, per_call_teams: [exact, audited]}\n").budget_slices
    assert not cfg.applies("exact") and not cfg.applies("audited") and cfg.applies("other")
    only = parse_config(BASE + b"budget_slices: {enabled: true, teams: [hot], per_call_teams: [hot]}\n").budget_slices
    assert not only.applies("hot") and not only.applies("other")


@pytest.mark.parametrize("bad", [b"budget_slices: {per_call_teams: exact}\n",
                                 b"budget_slices: {per_call_teams: ['Bad Team']}\n"])
def test_a_bad_per_call_teams_list_is_refused(bad: bytes) -> None:
    with pytest.raises(ConfigError, match="per_call_teams"):
        parse_config(BASE + bad)
