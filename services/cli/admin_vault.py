"""Operator commands on the vault: keys, the audit log, master-key rewrap."""

from __future__ import annotations

import argparse
import base64
import binascii
import getpass
import os
import sys
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from igw.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from services.cli.admin_common import (
    AUDIT_ACTIONS,
    AUDIT_OUTCOMES,
    _dur,
    _enum_name,
    _ts,
    check_range,
)
from services.cli.output import (
    format_duration,
    format_timestamp,
    message_to_dict,
    print_json,
    print_table,
)
from services.cli.parsing import CliError
from services.cli.session import Session

# --------------------------------------------------------------------------- keys


def read_secret(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> str:
    """The secret from --secret-env, --secret-file or stdin; never from an argument, never echoed."""
    source = os.environ if env is None else env
    if getattr(args, "secret_env", None):
        value = source.get(args.secret_env, "")
        if not value.strip():
            raise CliError(f"environment variable {args.secret_env} is not set or empty")
    elif getattr(args, "secret_file", None):
        try:
            value = Path(args.secret_file).read_text()
        except OSError as err:
            raise CliError(f"cannot read secret file {args.secret_file}: {err.strerror}") from None
    elif sys.stdin.isatty():
        value = getpass.getpass("secret (not echoed): ")
    else:
        value = sys.stdin.read()
    value = value.strip()
    if not value:
        raise CliError("the secret is empty")
    if "\n" in value:
        raise CliError("the secret spans several lines; give exactly one")
    return value


def _vault(session: Session) -> keyvault_pb2_grpc.KeyVaultAdminServiceStub:
    return keyvault_pb2_grpc.KeyVaultAdminServiceStub(session.channel("keyvault"))  # type: ignore[no-untyped-call]


def _key_rows(keys: Iterable[keyvault_pb2.ProviderKey]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for key in keys:
        current = next((v for v in key.versions if v.version == key.current_version), None)
        rows.append(
            (
                key.name,
                key.provider,
                _enum_name(keyvault_pb2.KeyState, key.state, "KEY_STATE_"),
                str(key.current_version),
                current.fingerprint if current else "",
                "all" if key.all_teams else ",".join(key.allowed_teams) or "none",
                key.base_url,
                format_duration(key.rotation_period) if key.HasField("rotation_period") else "-",
                "yes" if key.rotation_due else "",
                ",".join(f"{k}={v}" for k, v in sorted(key.labels.items())),
            )
        )
    return rows


_KEY_HEADERS = ["name", "provider", "state", "ver", "fp", "teams", "base url", "rotate", "due", "labels"]


def _print_key(session: Session, key: keyvault_pb2.ProviderKey, verb: str) -> int:
    if session.json:
        print_json(key)
    else:
        print(f"{verb} {key.name}" + (f" (version {key.current_version})" if key.current_version else ""))
        print_table(_KEY_HEADERS, _key_rows([key]))
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    """`igw keys create NAME --provider P --base-url URL (--all-teams | --team T...)`."""
    secret = read_secret(args)
    session = Session(args)
    request = keyvault_pb2.CreateProviderKeyRequest(
        request_id=uuid.uuid4().hex,
        name=args.name,
        provider=args.provider,
        secret=secret,
        base_url=args.base_url,
        allowed_teams=args.teams or [],
        all_teams=bool(args.all_teams),
        labels=dict(args.label),
        rotation_period=_dur(args.rotate_every),
    )
    key = _vault(session).CreateProviderKey(request, timeout=session.timeout)
    return _print_key(session, key, "created")


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    """`igw keys rotate NAME [--grace 1h]`."""
    secret = read_secret(args)
    session = Session(args)
    request = keyvault_pb2.RotateProviderKeyRequest(
        request_id=uuid.uuid4().hex, name=args.name, secret=secret, grace_period=_dur(args.grace)
    )
    key = _vault(session).RotateProviderKey(request, timeout=session.timeout)
    return _print_key(session, key, "rotated")


def cmd_keys_disable(args: argparse.Namespace) -> int:
    """`igw keys disable NAME`."""
    session = Session(args)
    request = keyvault_pb2.DisableProviderKeyRequest(request_id=uuid.uuid4().hex, name=args.name)
    key = _vault(session).DisableProviderKey(request, timeout=session.timeout)
    return _print_key(session, key, "disabled")


def _list_keys(stub: keyvault_pb2_grpc.KeyVaultAdminServiceStub, provider: str, timeout: float) -> list[Any]:
    keys: list[Any] = []
    token = ""
    while True:
        page = stub.ListProviderKeys(
            keyvault_pb2.ListProviderKeysRequest(provider=provider, page_size=1000, page_token=token),
            timeout=timeout,
        )
        keys.extend(page.keys)
        token = page.next_page_token
        if not token:
            return keys


def cmd_keys_list(args: argparse.Namespace) -> int:
    """`igw keys list [--provider P]`."""
    session = Session(args)
    keys = _list_keys(_vault(session), args.provider or "", session.timeout)
    if session.json:
        print_json({"keys": [message_to_dict(k) for k in keys]})
    else:
        print_table(_KEY_HEADERS, _key_rows(keys), empty="no provider keys")
    return 0


def cmd_keys_import_env(args: argparse.Namespace) -> int:
    """`igw keys import-env`: OPENAI/ANTHROPIC/GEMINI_API_KEY from the environment into the vault."""
    from services.keyvault.importenv import ENV_KEYS, import_env

    session = Session(args)
    present = [k for k in ENV_KEYS if os.environ.get(k.variable, "").strip()]
    if not present:
        names = ", ".join(k.variable for k in ENV_KEYS)
        raise CliError(f"no provider key in the environment (set one of {names})", exit_code=1)
    created = set(import_env(_vault(session), os.environ, timeout=session.timeout))
    rows = [
        (
            k.name,
            k.provider,
            k.variable,
            "created"
            if k.name in created
            else f"exists, left alone (rotate: igw keys rotate {k.name} --secret-env {k.variable})",
        )
        for k in present
    ]
    if session.json:
        print_json(
            {"keys": [{"name": n, "provider": p, "variable": v, "created": n in created} for n, p, v, _ in rows]}
        )
    else:
        print_table(["key", "provider", "from", "result"], rows)
    return 0



# --------------------------------------------------------------------------- audit


def cmd_audit_list(args: argparse.Namespace) -> int:
    """`igw audit list [--team T] [--key K] [--action A] [--limit N]`."""
    if args.limit < 1:
        raise CliError("--limit must be at least 1")
    check_range(args.since, args.until)
    session = Session(args)
    stub = _vault(session)
    events: list[Any] = []
    token = ""
    while len(events) < args.limit:
        page = stub.ListAuditEvents(
            keyvault_pb2.ListAuditEventsRequest(
                action=AUDIT_ACTIONS[args.action] if args.action else keyvault_pb2.AUDIT_ACTION_UNSPECIFIED,
                outcome=AUDIT_OUTCOMES[args.outcome] if args.outcome else keyvault_pb2.AUDIT_OUTCOME_UNSPECIFIED,
                key_name=args.key_name,
                team=args.team,
                request_id=args.request_id,
                start_time=_ts(args.since),
                end_time=_ts(args.until),
                page_size=min(args.limit - len(events), 1000),
                page_token=token,
            ),
            timeout=session.timeout,
        )
        events.extend(page.events)
        token = page.next_page_token
        if not token or not page.events:
            break
    events = events[: args.limit]
    if session.json:
        print_json({"events": [message_to_dict(e) for e in events]})
        return 0
    rows = [
        (
            str(e.sequence),
            format_timestamp(e.create_time),
            e.actor.removeprefix("spiffe://"),
            _enum_name(keyvault_pb2.AuditAction, e.action, "AUDIT_ACTION_"),
            _enum_name(keyvault_pb2.AuditOutcome, e.outcome, "AUDIT_OUTCOME_") + (f" {e.reason}" if e.reason else ""),
            f"{e.key_name}:{e.key_version}" if e.key_name and e.key_version else e.key_name,
            e.team,
            e.model,
            e.request_id,
        )
        for e in events
    ]
    print_table(
        ["seq", "time", "actor", "action", "outcome", "key", "team", "model", "request"], rows, empty="no audit records"
    )
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """`igw audit verify [--anchor SEQ:HASH]`: exit 0 when the chain verifies, 1 when not."""
    session = Session(args)
    req = keyvault_pb2.VerifyAuditLogRequest()
    if args.anchor:
        seq, _, digest = args.anchor.partition(":")
        if not seq.isdigit() or not digest:
            raise CliError("--anchor takes SEQ:HASH, as printed by an earlier `igw audit verify`")
        req.anchor_sequence, req.anchor_hash = int(seq), digest
    response = _vault(session).VerifyAuditLog(req, timeout=session.timeout)
    if session.json:
        print_json(response)
    elif response.ok:
        print(f"audit log ok: {response.records_checked} records verified")
        if response.head_sequence:
            print(f"head {response.head_sequence}:{response.head_hash}"
                  " (keep it outside the vault; `--anchor` it next time to show a cut-off tail)")
    else:
        print(
            f"audit log BROKEN at record {response.first_bad_sequence}: {response.reason} "
            f"({response.records_checked} records checked)",
            file=sys.stderr,
        )
    return 0 if response.ok else 1



# --------------------------------------------------------------------------- vault rewrap


def _vault_database_url(state_dir: Path) -> tuple[str, Any]:
    """The vault database of an `igw up` state directory, and a stopper if we started Postgres."""
    env_url = os.environ.get("IGW_KEYVAULT_DATABASE_URL")  # never IGW_DATABASE_URL: that is the ledger's
    if env_url:
        return env_url, None
    pg_dir = state_dir / "pg"
    if not pg_dir.is_dir():
        raise CliError(f"{state_dir} has no embedded Postgres (pg/); pass --database-url")
    try:  # the embedded Postgres of `igw up` is dev tooling
        from igw_dev.pg import EmbeddedPostgres
    except ModuleNotFoundError as err:
        from services.cli.commands_dev import dev_package_missing

        raise dev_package_missing(f"the embedded Postgres of {state_dir} (or pass --database-url)", err) from None

    pg = EmbeddedPostgres(pg_dir, stop_at_exit=False)
    stop = None
    if not pg.is_running():
        pg.start()
        stop = pg.stop
    return pg.url("igw_keyvault"), stop


def read_master_key_file(flag: str, path: Path) -> bytes:
    """The 32 raw bytes of a master key file (base64 text, as `igw up` writes it)."""
    from services.keyvault import crypto

    try:
        text = path.read_text()
    except OSError as err:
        raise CliError(f"{flag} {path} cannot be read: {err.strerror}") from None
    try:
        crypto.decode_master_key(text, f"{flag} {path}")
    except crypto.MasterKeyError as err:
        raise CliError(str(err)) from None
    stripped = "".join(text.split())
    try:
        return base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        return base64.urlsafe_b64decode(stripped)


def _os_user() -> str:
    """Who runs the command (for the audit record); "unknown" when the system cannot say."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
    return "".join(c for c in name if c.isalnum() or c in "._-")[:64] or "unknown"


def cmd_vault_rewrap(args: argparse.Namespace) -> int:
    """`igw vault rewrap (--state-dir D | --database-url URL) --old-key-file F --new-key-file F`.

    Offline maintenance: restart the vaults with the new key afterwards.
    """
    for flag, path in (("--old-key-file", args.old_key_file), ("--new-key-file", args.new_key_file)):
        if not path.is_file():
            raise CliError(f"{flag} {path} not found")
    old = read_master_key_file("--old-key-file", args.old_key_file)
    new = read_master_key_file("--new-key-file", args.new_key_file)
    if old == new:
        raise CliError("--old-key-file and --new-key-file hold the same key")
    from services.keyvault.rewrap import RewrapError, rewrap

    stop = None
    if args.database_url:
        url = args.database_url
    else:
        url, stop = _vault_database_url(args.state_dir)
    try:
        # Run on the host, not over mTLS: the audit record names the operating-system user instead.
        count = rewrap(url, old, new, request_id=uuid.uuid4().hex, actor=f"local:igw-vault-rewrap:{_os_user()}")
    except RewrapError as err:
        raise CliError(f"rewrap refused, nothing changed: {err}", exit_code=1) from None
    finally:
        if stop is not None:
            stop()
    if getattr(args, "json", False):
        print_json({"rewrapped": count})
    else:
        print(f"rewrapped {count} data keys; restart the vaults with the new master key")
    return 0
