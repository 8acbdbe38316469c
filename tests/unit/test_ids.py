"""One rule per identifier, the same in every service."""

from __future__ import annotations

import pytest

from services.common import errors as E
from services.common import ids
from services.keyvault import domain as vault
from services.ledger import domain as ledger

TEAMS_OK = ["a", "team-1", "Team_2.x", "t" * 64]
TEAMS_BAD = ["", "t" * 65, "team/1", "team:1", "tëam", "te am", "team\n"]


@pytest.mark.parametrize("team", TEAMS_OK)
def test_a_valid_team_is_accepted_by_the_ledger_and_the_vault(team: str) -> None:
    assert ids.is_segment(team)
    assert ledger.check_principal("team", team) == team
    assert vault.check_team(team) == team


@pytest.mark.parametrize("team", TEAMS_BAD)
def test_an_invalid_team_is_refused_by_the_ledger_and_the_vault(team: str) -> None:
    assert not ids.is_segment(team)
    with pytest.raises(E.InvalidArgument):
        ledger.check_principal("team", team)
    with pytest.raises(E.InvalidArgument):
        vault.check_team(team)


def test_a_65_character_team_is_refused_by_the_ledger_as_a_certificate_could_never_name_it() -> None:
    with pytest.raises(E.InvalidArgument) as err:
        ledger.check_principal("team", "t" * 65)
    assert err.value.metadata["field"] == "team"


@pytest.mark.parametrize("rid", ["r-1", "a:b.c_d", "x" * 128])
def test_a_valid_request_id_is_accepted_everywhere(rid: str) -> None:
    assert ids.is_request_id(rid)
    assert ledger.check_request_id(rid) == rid
    assert vault.check_request_id(rid) == rid


@pytest.mark.parametrize("rid", ["", "x" * 129, "a/b", "a b", "ä"])
def test_an_invalid_request_id_is_refused_everywhere(rid: str) -> None:
    assert not ids.is_request_id(rid)
    with pytest.raises(E.InvalidArgument):
        ledger.check_request_id(rid)
    with pytest.raises(E.InvalidArgument):
        vault.check_request_id(rid)


def _anchored_patterns() -> list[tuple[str, object]]:
    from services.cli import commands_probe
    from services.keyvault import crypto
    from services.router import translate
    from services.router.providers import base, errors

    found = []
    for module in (ids, vault, crypto, translate, base, errors, commands_probe):
        for name, value in vars(module).items():
            if hasattr(value, "pattern") and isinstance(value.pattern, str) and value.pattern.startswith("^"):
                found.append((f"{module.__name__}.{name}", value))
    return found


@pytest.mark.parametrize(("name", "pattern"), _anchored_patterns())
def test_no_identifier_pattern_lets_a_trailing_newline_through(name: str, pattern: object) -> None:
    # re's "$" matches before a final newline; every anchored rule must end in \Z instead.
    assert pattern.pattern.endswith("\\Z"), name  # type: ignore[attr-defined]
