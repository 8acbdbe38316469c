"""services/ledger/sql/ holds every ledger function exactly as the head schema runs it."""

from __future__ import annotations

import os
from pathlib import Path

from tests.integration.ledger_support import migrate, sql

SQL_DIR = Path(__file__).resolve().parents[2] / "services" / "ledger" / "sql"


def _head_functions(url: str) -> dict[str, str]:
    rows = sql(
        url,
        "SELECT p.proname, pg_get_functiondef(p.oid) FROM pg_proc p"
        " JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'public' AND p.proname LIKE 'ledger%%' ORDER BY 1",
    )
    by_name: dict[str, str] = {}
    for name, definition in rows:
        assert name not in by_name, f"{name} is overloaded; one signature per ledger function"
        by_name[name] = definition.strip() + "\n"
    return by_name


def _files() -> dict[str, str]:
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(SQL_DIR.glob("*.sql"))}


def test_every_ledger_function_at_head_matches_its_sql_file(fresh_database: str) -> None:
    migrate(fresh_database)
    head = _head_functions(fresh_database)
    assert head, "the head schema defines no ledger functions"
    if os.environ.get("IGW_UPDATE_LEDGER_SQL") == "1":
        for stale in set(_files()) - set(head):
            (SQL_DIR / f"{stale}.sql").unlink()
        for name, definition in head.items():
            (SQL_DIR / f"{name}.sql").write_text(definition, encoding="utf-8")
    files = _files()
    assert sorted(files) == sorted(head), "a function without its file, or a file without its function"
    for name, definition in head.items():
        assert files[name] == definition, f"services/ledger/sql/{name}.sql differs from the head schema"
