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


def test_per_call_holds_are_the_default_and_one_line_turns_slices_on_for_every_team() -> None:
    # Off by default: a router killed -9 loses the queued settles of slice-held calls (the slice's
    # capture covers the money, but not one spend entry per call); see docs/operations.md.
    default = parse_config(BASE).budget_slices
    assert not default.enabled and not default.applies("any-team")
    cfg = parse_config(BASE + b"budget_slices: {enabled: true}\n").budget_slices
    assert cfg.enabled and (cfg.calls, cfg.draw_window_ms) == (64, 20_000)
    assert cfg.applies("any-team") and cfg.applies("another")


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
