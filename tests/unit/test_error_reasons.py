"""One catalogue of error reasons: the ``ErrorReason`` enum in protos/igw/rpc/v1/error_reason.proto.

Every reason a server can put in a ``google.rpc.ErrorInfo`` is a value of that enum, every value is
raised somewhere (or is one of the typed client's own local reasons), and the typed client matches
only on catalogued reasons. The reasons raised are found by reading the services' source: the first
argument of every error constructor, of every helper that returns an error, and the vault's
``<FIELD>_INVALID`` reasons built from a field name.
"""

from __future__ import annotations

import ast
from pathlib import Path

from igw.client import _errors as client_errors
from igw.rpc.v1 import error_reason_pb2

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "services"
ERROR_CLASSES = {
    "IgwError", "InvalidArgument", "NotFound", "AlreadyExists", "FailedPrecondition", "PermissionDenied",
    "ResourceExhausted", "Unavailable", "DeadlineExceeded", "Aborted", "Internal", "IdentityError",
}
# Reasons the typed client makes up itself, for errors that never reached a server.
CLIENT_LOCAL = {"CLIENT_CONFIG", "CERTIFICATE_EXPIRED"}
# The vault names a bad field in its reason: <FIELD>_INVALID, built by these helpers from their first argument.
FIELD_REASON_HELPERS = {"_bad", "_duration", "check_duration", "check_team"}


def _upper_snake(node: ast.AST | None) -> str | None:
    if isinstance(node, ast.IfExp):  # info.reason if info else "FALLBACK"
        return _upper_snake(node.orelse) or _upper_snake(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        text = node.value
        if text and text.replace("_", "").isalnum() and text.upper() == text and not text[0].isdigit():
            return text
    return None


def _callee_name(func: ast.AST) -> str:
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _callee(node: ast.Call) -> str:
    return _callee_name(node.func)


def _error_helpers(tree: ast.Module) -> set[str]:
    """A module's functions whose return annotation names an error class and that take the reason first."""
    helpers = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.returns is not None and node.args.args:
            returns = ast.unparse(node.returns)
            if any(name in returns for name in ERROR_CLASSES) and node.args.args[0].arg == "reason":
                helpers.add(node.name)
    return helpers


def raised_reasons() -> dict[str, set[str]]:
    """Reason -> the files that raise it."""
    trees = {
        p: ast.parse(p.read_text(encoding="utf-8"))
        for p in SERVICES.rglob("*.py") if "fakes" not in p.parts
    }
    found: dict[str, set[str]] = {}
    # Public helpers (e.g. the HTTPS edge's bad_field) are called from other modules too.
    shared = {h for t in trees.values() for h in _error_helpers(t) if not h.startswith("_")}
    for path, tree in trees.items():
        rel = str(path.relative_to(ROOT))
        helpers = _error_helpers(tree) | shared
        for node in ast.walk(tree):
            # A table of (reason, error class) pairs, e.g. errors that go straight back to the agent.
            if isinstance(node, ast.Tuple) and len(node.elts) == 2 and _callee_name(node.elts[1]) in ERROR_CLASSES:
                if reason := _upper_snake(node.elts[0]):
                    found.setdefault(reason, set()).add(rel)
            # A table of reasons, e.g. _CONFIG_REASON = {kind: "PROVIDER_AUTH_FAILED", ...}, and the
            # defaults of its lookups (_CONFIG_REASON.get(cause, "NO_CREDENTIAL")).
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                    and any("REASON" in ast.unparse(t) for t in node.targets)):
                for const in node.value.values:
                    if reason := _upper_snake(const):
                        found.setdefault(reason, set()).add(rel)
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and "REASON" in ast.unparse(node.func.value) and len(node.args) == 2):
                if reason := _upper_snake(node.args[1]):
                    found.setdefault(reason, set()).add(rel)
            # reason = <expr> if <cond> else "FALLBACK" before an error built from `reason`.
            if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["reason"]:
                if isinstance(node.value, ast.IfExp) and (reason := _upper_snake(node.value)):
                    found.setdefault(reason, set()).add(rel)
            if not isinstance(node, ast.Call):
                continue
            name = _callee(node)
            first = node.args[0] if node.args else None
            reason: str | None = None
            if name in ERROR_CLASSES or name in helpers:
                reason = _upper_snake(first) or _upper_snake(
                    next((k.value for k in node.keywords if k.arg == "reason"), None))
            elif name in FIELD_REASON_HELPERS and "keyvault" in path.parts:
                args = node.args[1:] if name in {"_duration", "check_team"} else node.args
                field = next((a.value for a in args[:1] if isinstance(a, ast.Constant)), None)
                if field is None and name == "check_team":
                    field = "team"  # its default field name
                if isinstance(field, str) and field.isidentifier():
                    reason = f"{field.upper()}_INVALID"
            if reason:
                found.setdefault(reason, set()).add(rel)
    return found


def catalogue() -> set[str]:
    return {v.name for v in error_reason_pb2.ErrorReason.DESCRIPTOR.values} - {"ERROR_REASON_UNSPECIFIED"}


def test_the_scan_finds_reasons_from_constructors_helpers_and_field_names() -> None:
    found = raised_reasons()
    assert "BUDGET_EXCEEDED" in found  # a helper returning ResourceExhausted
    assert "BAD_TEMPERATURE" in found  # translate's _bad(reason, message)
    assert "REQUEST_ID_INVALID" in found  # the vault's <FIELD>_INVALID
    assert "UNTRUSTED_IDENTITY" in found  # IdentityError


def test_every_reason_a_server_raises_is_in_the_catalogue() -> None:
    missing = {r: sorted(files) for r, files in raised_reasons().items() if r not in catalogue()}
    assert missing == {}


def test_every_catalogued_reason_is_raised_by_a_server_or_is_the_clients_own() -> None:
    unused = catalogue() - set(raised_reasons()) - CLIENT_LOCAL
    assert unused == set()


def test_the_typed_client_matches_only_catalogued_reasons() -> None:
    assert set(client_errors._BY_REASON) <= catalogue()
    assert CLIENT_LOCAL <= catalogue()
