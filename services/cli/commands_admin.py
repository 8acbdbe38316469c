"""Operator commands, with the operator certificate: keys, budgets, spend, audit, config,
deployments, prices and vault rewrap."""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime as dt
import getpass
import os
import sys
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from igw.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from igw.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from igw.router.v1 import router_pb2, router_pb2_grpc
from services.cli.common import (
    CliError,
    Session,
    SubParsers,
    common_options,
    dollars_arg,
    duration_arg,
    label_arg,
    nanos_to_dollars,
    time_arg,
)
from services.cli.output import (
    format_duration,
    format_timestamp,
    message_to_dict,
    print_json,
    print_table,
)

__all__ = ["group_by_arg", "read_secret", "register"]

WINDOWS = {
    "daily": ledger_pb2.BUDGET_WINDOW_DAILY,
    "weekly": ledger_pb2.BUDGET_WINDOW_WEEKLY,
    "monthly": ledger_pb2.BUDGET_WINDOW_MONTHLY,
    "total": ledger_pb2.BUDGET_WINDOW_TOTAL,
}
GROUP_BY = {
    "team": ledger_pb2.SPEND_GROUP_BY_TEAM,
    "agent": ledger_pb2.SPEND_GROUP_BY_AGENT,
    "model": ledger_pb2.SPEND_GROUP_BY_MODEL,
    "provider": ledger_pb2.SPEND_GROUP_BY_PROVIDER,
    "day": ledger_pb2.SPEND_GROUP_BY_DAY,
    "run": ledger_pb2.SPEND_GROUP_BY_RUN,
}
AUDIT_ACTIONS = {
    "issue": keyvault_pb2.AUDIT_ACTION_ISSUE_CREDENTIAL,
    "create": keyvault_pb2.AUDIT_ACTION_CREATE_KEY,
    "rotate": keyvault_pb2.AUDIT_ACTION_ROTATE_KEY,
    "disable": keyvault_pb2.AUDIT_ACTION_DISABLE_KEY,
    "rewrap": keyvault_pb2.AUDIT_ACTION_REWRAP,
    "lease-used": keyvault_pb2.AUDIT_ACTION_LEASE_USED,
    "lease-returned": keyvault_pb2.AUDIT_ACTION_LEASE_RETURNED,
}
AUDIT_OUTCOMES = {"allowed": keyvault_pb2.AUDIT_OUTCOME_ALLOWED, "denied": keyvault_pb2.AUDIT_OUTCOME_DENIED}


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix).lower()
    except ValueError:
        return str(value)


def group_by_arg(text: str) -> list[str]:
    """argparse type: ``team,agent,model,provider,day``."""
    dims = [d.strip().lower() for d in text.split(",") if d.strip()]
    bad = [d for d in dims if d not in GROUP_BY]
    if bad:
        raise argparse.ArgumentTypeError(f"cannot group by {', '.join(bad)} (choose from {', '.join(GROUP_BY)})")
    if len(set(dims)) != len(dims):
        raise argparse.ArgumentTypeError(f"a dimension is repeated in {text!r}")
    return dims


def _ts(value: dt.datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value.astimezone(dt.UTC))
    return ts


def _dur(value: dt.timedelta | None) -> Duration | None:
    if value is None:
        return None
    d = Duration()
    d.FromTimedelta(value)
    return d


# --------------------------------------------------------------------------- registration


def register(sub: SubParsers, parent: argparse.ArgumentParser) -> None:
    """Adds keys, budgets, spend, audit, config, deployments, prices and vault."""
    _register_keys(sub, parent)
    _register_budgets(sub, parent)
    _register_spend(sub, parent)
    _register_limits(sub, parent)
    _register_audit(sub, parent)

    config = sub.add_parser("config", help="the router's routing config")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="{show,reload}")
    show = config_sub.add_parser("show", parents=[parent], help="active config digest and summary")
    show.set_defaults(func=cmd_config_show)
    reload_ = config_sub.add_parser("reload", parents=[parent], help="reload the config file (bad: old stays)")
    reload_.set_defaults(func=cmd_config_reload)

    deployments = sub.add_parser("deployments", parents=[parent], help="deployments with breaker state")
    deployments.set_defaults(func=cmd_deployments)

    prices = sub.add_parser("prices", help="the ledger's price catalogue")
    prices_sub = prices.add_subparsers(dest="prices_command", required=True, metavar="{list,set}")
    plist = prices_sub.add_parser("list", parents=[parent], help="prices per million tokens")
    plist.add_argument("--version", type=int, default=0, help="a catalogue version (default: current)")
    plist.set_defaults(func=cmd_prices_list)
    pset = prices_sub.add_parser("set", parents=[parent], help="set one model's prices (new catalogue version)")
    pset.add_argument("model", help="the model price key, e.g. gpt-4o-mini")
    pset.add_argument("--input", required=True, type=dollars_arg, metavar="$/MTOK", help="input $ per 1M tokens")
    pset.add_argument("--output", required=True, type=dollars_arg, metavar="$/MTOK", help="output $ per 1M tokens")
    pset.add_argument("--cached", type=dollars_arg, metavar="$/MTOK", help="cached input $ per 1M tokens")
    pset.set_defaults(func=cmd_prices_set)

    vault = sub.add_parser("vault", help="offline vault maintenance")
    vault_sub = vault.add_subparsers(dest="vault_command", required=True, metavar="{rewrap}")
    rewrap = vault_sub.add_parser("rewrap", parents=[parent], help="re-wrap every data key under a new master key")
    where = rewrap.add_mutually_exclusive_group(required=True)
    where.add_argument("--state-dir", type=Path, help="the `igw up` state directory (embedded Postgres)")
    where.add_argument("--database-url", help="the vault's database URL")
    rewrap.add_argument("--old-key-file", required=True, type=Path, help="file with the current master key")
    rewrap.add_argument("--new-key-file", required=True, type=Path, help="file with the new master key")
    rewrap.set_defaults(func=cmd_vault_rewrap)


def _register_keys(sub: SubParsers, parent: argparse.ArgumentParser) -> None:
    keys = sub.add_parser("keys", help="provider API keys in the vault")
    keys_sub = keys.add_subparsers(
        dest="keys_command", required=True, metavar="{create,rotate,disable,list,import-env}"
    )

    def secret_source(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group()
        group.add_argument("--secret-env", metavar="VAR", help="read the secret from environment variable VAR")
        group.add_argument("--secret-file", metavar="PATH", type=Path, help="read the secret from a file")
        p.epilog = "Without --secret-env/--secret-file the secret is read from stdin (never an argument)."

    create = keys_sub.add_parser("create", parents=[parent], help="store a new provider key")
    create.add_argument("name", help="unique key name, e.g. openai-prod-1")
    create.add_argument("--provider", required=True, help="provider name as in the routing config")
    create.add_argument("--base-url", required=True, help="the only base URL the secret may be sent to")
    teams = create.add_mutually_exclusive_group(required=True)
    teams.add_argument("--all-teams", action="store_true", help="every team may use it")
    teams.add_argument("--team", dest="teams", action="append", metavar="TEAM", help="a team that may use it")
    create.add_argument("--label", action="append", type=label_arg, default=[], metavar="K=V", help="a label")
    create.add_argument("--rotate-every", type=duration_arg, metavar="DURATION", help="rotation schedule, e.g. 90d")
    secret_source(create)
    create.set_defaults(func=cmd_keys_create)

    rotate = keys_sub.add_parser("rotate", parents=[parent], help="add a new version of a key")
    rotate.add_argument("name")
    rotate.add_argument("--grace", type=duration_arg, metavar="DURATION", help="old version keeps working (1h)")
    secret_source(rotate)
    rotate.set_defaults(func=cmd_keys_rotate)

    disable = keys_sub.add_parser("disable", parents=[parent], help="disable a key (every version) now")
    disable.add_argument("name")
    disable.set_defaults(func=cmd_keys_disable)

    klist = keys_sub.add_parser("list", parents=[parent], help="key metadata (never secrets)")
    klist.add_argument("--provider", help="only this provider")
    klist.set_defaults(func=cmd_keys_list)

    imp = keys_sub.add_parser(
        "import-env",
        parents=[parent],
        help="store OPENAI_API_KEY / ANTHROPIC_API_KEY / GEMINI_API_KEY from the environment",
    )
    imp.set_defaults(func=cmd_keys_import_env)


def _register_budgets(sub: SubParsers, parent: argparse.ArgumentParser) -> None:
    budgets = sub.add_parser("budgets", help="team and agent budgets")
    budgets_sub = budgets.add_subparsers(dest="budgets_command", required=True, metavar="{set,get,list,delete}")
    bset = budgets_sub.add_parser("set", parents=[parent], help="create or replace a budget")
    bset.add_argument("--team", required=True)
    bset.add_argument("--agent", default="", help="one agent of the team (default: the whole team)")
    bset.add_argument("--run", default="", help="a run of the team: its cap (window total)")
    bset.add_argument("--window", choices=list(WINDOWS), help="required unless --run (always total)")
    bset.add_argument("--limit", required=True, type=dollars_arg, metavar="DOLLARS", help="hard limit, e.g. 25.00")
    bset.add_argument("--soft", type=dollars_arg, default=0, metavar="DOLLARS", help="alert threshold")
    bset.set_defaults(func=cmd_budgets_set)
    bget = budgets_sub.add_parser("get", parents=[parent], help="budgets with spend, holds and remaining")
    bget.add_argument("--team", required=True)
    bget.add_argument("--agent", default="")
    bget.set_defaults(func=cmd_budgets_get)
    blist = budgets_sub.add_parser("list", parents=[parent], help="configured budgets (every page)")
    blist.add_argument("--team", default="", help="only this team")
    blist.add_argument("--runs", action="store_true", help="include run budgets")
    blist.set_defaults(func=cmd_budgets_list)
    bdel = budgets_sub.add_parser("delete", parents=[parent], help="delete one budget")
    bdel.add_argument("--team", required=True)
    bdel.add_argument("--agent", default="")
    bdel.add_argument("--run", default="")
    bdel.add_argument("--window", choices=list(WINDOWS), help="required unless --run")
    bdel.set_defaults(func=cmd_budgets_delete)


def _register_limits(sub: SubParsers, parent: argparse.ArgumentParser) -> None:
    limits = sub.add_parser("limits", help="team and agent rate limits (requests and tokens per minute)")
    limits_sub = limits.add_subparsers(dest="limits_command", required=True, metavar="{set,get}")
    lset = limits_sub.add_parser(
        "set", parents=[parent], help="set a team's (or agent's) rate limits; a limit not given is kept; 0 clears")
    lset.add_argument("--team", required=True)
    lset.add_argument("--agent", default="", help="one agent of the team (default: the whole team)")
    lset.add_argument("--rpm", type=int, default=None, metavar="N", help="requests per minute (0: none)")
    lset.add_argument("--tpm", type=int, default=None, metavar="N", help="input+output tokens per minute (0: none)")
    lset.set_defaults(func=cmd_limits_set)
    lget = limits_sub.add_parser("get", parents=[parent], help="a team's rate limits and the last minute's use")
    lget.add_argument("--team", required=True)
    lget.set_defaults(func=cmd_limits_get)


def _register_spend(sub: SubParsers, parent: argparse.ArgumentParser) -> None:
    spend = sub.add_parser("spend", parents=[parent], help="spend totals (or `spend entries`)")
    spend.add_argument("--by", type=group_by_arg, default=[], metavar="DIMS", help="team,agent,model,provider,day,run")
    spend.add_argument("--team", default="", help="only this team")
    spend.add_argument("--run", default="", help="only this run (with --team)")
    spend.add_argument("--since", type=time_arg, metavar="TIME", help="2026-11-01, an ISO time or 24h/7d ago")
    spend.add_argument("--until", type=time_arg, metavar="TIME", help="end (exclusive), same forms")
    spend.set_defaults(func=cmd_spend)
    spend_sub = spend.add_subparsers(dest="spend_command", required=False, metavar="{entries}")
    entries = spend_sub.add_parser("entries", parents=[parent], help="individual spend entries, newest first")
    entries.add_argument("--team", default="", help="only this team")
    entries.add_argument("--since", type=time_arg, metavar="TIME")
    entries.add_argument("--until", type=time_arg, metavar="TIME")
    entries.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    entries.set_defaults(func=cmd_spend_entries)


def _register_audit(sub: SubParsers, parent: argparse.ArgumentParser) -> None:
    audit = sub.add_parser("audit", help="the vault's hash-chained audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="{list,verify}")
    # `--key NAME` filters by key name here; the TLS key is `--tls-key`.
    alist = audit_sub.add_parser(
        "list", parents=[common_options(plain_key_option=False)], help="audit records, newest first"
    )
    alist.add_argument("--team", default="")
    alist.add_argument("--key", dest="key_name", default="", metavar="NAME", help="only this key name")
    alist.add_argument("--action", choices=list(AUDIT_ACTIONS))
    alist.add_argument("--outcome", choices=list(AUDIT_OUTCOMES))
    alist.add_argument("--request-id", default="")
    alist.add_argument("--since", type=time_arg, metavar="TIME")
    alist.add_argument("--until", type=time_arg, metavar="TIME")
    alist.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    alist.set_defaults(func=cmd_audit_list)
    verify = audit_sub.add_parser("verify", parents=[parent], help="walk the hash chain; exit 1 when broken")
    verify.add_argument(
        "--anchor", metavar="SEQ:HASH", default="",
        help="a head printed by an earlier verify and kept outside the vault: the chain must still hold it "
             "(shows a cut-off tail, which the chain alone cannot)",
    )
    verify.set_defaults(func=cmd_audit_verify)


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


# --------------------------------------------------------------------------- budgets


def _budget_rows(budgets: Iterable[ledger_pb2.BudgetStatus]) -> list[tuple[str, ...]]:
    return [
        (
            b.team,
            b.agent or "*",
            _enum_name(ledger_pb2.BudgetWindow, b.window, "BUDGET_WINDOW_"),
            nanos_to_dollars(b.limit_nanos),
            nanos_to_dollars(b.soft_limit_nanos) if b.soft_limit_nanos else "-",
            nanos_to_dollars(b.spent_nanos),
            nanos_to_dollars(b.held_nanos),
            nanos_to_dollars(b.remaining_nanos),
            format_timestamp(b.window_end),
        )
        for b in budgets
    ]


BUDGET_HEADERS = ["team", "agent", "window", "limit", "soft", "spent", "held", "remaining", "resets"]


def cmd_budgets_set(args: argparse.Namespace) -> int:
    """`igw budgets set --team T [--agent A] --window W --limit $ [--soft $]`."""
    if args.soft and args.soft > args.limit:
        raise CliError("--soft must not exceed --limit")
    window = _window(args)
    session = Session(args)
    stub = ledger_pb2_grpc.LedgerAdminServiceStub(session.channel("ledger"))  # type: ignore[no-untyped-call]
    budget = stub.SetBudget(
        ledger_pb2.SetBudgetRequest(
            team=args.team,
            agent=args.agent,
            window=window,
            limit_nanos=args.limit,
            soft_limit_nanos=args.soft or 0,
            run=args.run,
        ),
        timeout=session.timeout,
    )
    if session.json:
        print_json(budget)
        return 0
    who = f"{budget.team}/{budget.agent}" if budget.agent else budget.team
    if budget.run:
        who = f"{budget.team} run {budget.run}"
    soft = f", soft {nanos_to_dollars(budget.soft_limit_nanos)}" if budget.soft_limit_nanos else ""
    window_name = _enum_name(ledger_pb2.BudgetWindow, budget.window, "BUDGET_WINDOW_")
    print(f"budget set: {who} {window_name} limit {nanos_to_dollars(budget.limit_nanos)}{soft}")
    return 0


def cmd_budgets_get(args: argparse.Namespace) -> int:
    """`igw budgets get --team T [--agent A]`."""
    session = Session(args)
    stub = ledger_pb2_grpc.LedgerServiceStub(session.channel("ledger"))  # type: ignore[no-untyped-call]
    response = stub.GetBudget(ledger_pb2.GetBudgetRequest(team=args.team, agent=args.agent), timeout=session.timeout)
    if session.json:
        print_json(response)
    else:
        print_table(BUDGET_HEADERS, _budget_rows(response.budgets), empty=f"no budget set for {args.team}")
    return 0


def _window(args: argparse.Namespace) -> Any:
    if args.run:
        if args.agent or (args.window and args.window != "total"):
            raise CliError("a run budget has no --agent and the total window")
        return ledger_pb2.BUDGET_WINDOW_TOTAL
    if not args.window:
        raise CliError("--window is required")
    return WINDOWS[args.window]


def cmd_budgets_list(args: argparse.Namespace) -> int:
    """`igw budgets list [--team T] [--runs]`: every page of ListBudgets."""
    session = Session(args)
    stub = _ledger_admin(session)
    budgets: list[Any] = []
    token = ""
    while True:
        page = stub.ListBudgets(
            ledger_pb2.ListBudgetsRequest(team=args.team, include_runs=args.runs, page_size=1000, page_token=token),
            timeout=session.timeout,
        )
        budgets.extend(page.budgets)
        token = page.next_page_token
        if not token:
            break
    if session.json:
        print_json(ledger_pb2.ListBudgetsResponse(budgets=budgets))
        return 0
    rows = [
        [b.team, b.agent or "-", b.run or "-", _enum_name(ledger_pb2.BudgetWindow, b.window, "BUDGET_WINDOW_"),
         nanos_to_dollars(b.limit_nanos), nanos_to_dollars(b.soft_limit_nanos) if b.soft_limit_nanos else "-"]
        for b in budgets
    ]
    print_table(["team", "agent", "run", "window", "limit", "soft"], rows, empty="no budgets")
    return 0


def cmd_budgets_delete(args: argparse.Namespace) -> int:
    """`igw budgets delete --team T [--agent A] [--run R] --window W`."""
    window = _window(args)
    session = Session(args)
    gone = _ledger_admin(session).DeleteBudget(
        ledger_pb2.DeleteBudgetRequest(team=args.team, agent=args.agent, run=args.run, window=window),
        timeout=session.timeout,
    )
    if session.json:
        print_json(gone)
        return 0
    print(f"budget deleted: {args.team}" + (f"/{args.agent}" if args.agent else "")
          + (f" run {args.run}" if args.run else "") + f" (limit was {nanos_to_dollars(gone.budget.limit_nanos)})")
    return 0


# --------------------------------------------------------------------------- rate limits


def cmd_limits_set(args: argparse.Namespace) -> int:
    """`igw limits set --team T [--agent A] [--rpm N] [--tpm N]`: a limit not given keeps its value."""
    if args.rpm is None and args.tpm is None:
        raise CliError("give --rpm and/or --tpm (0 clears that limit)")
    if (args.rpm or 0) < 0 or (args.tpm or 0) < 0:
        raise CliError("--rpm and --tpm must be >= 0")
    session = Session(args)
    stub = _ledger_admin(session)
    rpm, tpm = args.rpm, args.tpm
    if rpm is None or tpm is None:
        current = {r.agent: r for r in stub.GetRateLimits(
            ledger_pb2.GetRateLimitsRequest(team=args.team), timeout=session.timeout).limits}
        mine = current.get(args.agent)
        rpm = rpm if rpm is not None else (mine.requests_per_minute if mine else 0)
        tpm = tpm if tpm is not None else (mine.tokens_per_minute if mine else 0)
    limit = stub.SetRateLimit(
        ledger_pb2.SetRateLimitRequest(team=args.team, agent=args.agent, requests_per_minute=rpm,
                                       tokens_per_minute=tpm),
        timeout=session.timeout,
    )
    if session.json:
        print_json(limit)
        return 0
    who = f"{limit.team}/{limit.agent}" if limit.agent else limit.team
    if not limit.requests_per_minute and not limit.tokens_per_minute:
        print(f"rate limits cleared: {who}")
    else:
        print(f"rate limits set: {who} rpm {limit.requests_per_minute or 'none'}"
              f" tpm {limit.tokens_per_minute or 'none'}")
    return 0


def cmd_limits_get(args: argparse.Namespace) -> int:
    """`igw limits get --team T`: the team's and its agents' limits with the last minute's use."""
    session = Session(args)
    response = _ledger_admin(session).GetRateLimits(
        ledger_pb2.GetRateLimitsRequest(team=args.team), timeout=session.timeout)
    if session.json:
        print_json(response)
        return 0
    rows = [
        [r.agent or "(team)", f"{r.requests_per_minute:,}" if r.requests_per_minute else "-",
         f"{r.requests_used:,}", f"{r.tokens_per_minute:,}" if r.tokens_per_minute else "-", f"{r.tokens_used:,}"]
        for r in response.limits
    ]
    print_table(["agent", "rpm", "requests (60s)", "tpm", "tokens (60s)"], rows,
                empty=f"no rate limits for {args.team}")
    return 0


# --------------------------------------------------------------------------- spend


def _ledger_admin(session: Session) -> ledger_pb2_grpc.LedgerAdminServiceStub:
    return ledger_pb2_grpc.LedgerAdminServiceStub(session.channel("ledger"))  # type: ignore[no-untyped-call]


def _check_range(since: dt.datetime | None, until: dt.datetime | None) -> None:
    if since is not None and until is not None and since >= until:
        raise CliError("--since must be before --until")


def cmd_spend(args: argparse.Namespace) -> int:
    """`igw spend [--by dims] [--team T] [--since ..] [--until ..]`."""
    _check_range(args.since, args.until)
    session = Session(args)
    request = ledger_pb2.ListSpendRequest(
        start_time=_ts(args.since),
        end_time=_ts(args.until),
        group_by=[GROUP_BY[d] for d in args.by],
        team=args.team,
        run=args.run,
        page_size=10000,
    )
    stub = _ledger_admin(session)
    response = stub.ListSpend(request, timeout=session.timeout)
    while response.next_page_token:
        request.page_token = response.next_page_token
        more = stub.ListSpend(request, timeout=session.timeout)
        response.totals.extend(more.totals)
        response.next_page_token = more.next_page_token
    if session.json:
        print_json(response)
        return 0
    if args.run and not args.team:
        raise CliError("--run needs --team")
    dims = list(args.by)
    for d in ("agent", "run"):
        if d in dims and "team" not in dims:
            dims.insert(dims.index(d), "team")
    headers = [*dims, "requests", "input tok", "output tok", "cached tok", "cost"]
    rows: list[list[str]] = []
    totals = [0, 0, 0, 0, 0]
    for t in response.totals:
        cells = []
        for d in dims:
            cells.append(format_timestamp(t.day, date_only=True) if d == "day" else getattr(t, d) or "-")
        numbers = [t.request_count, t.usage.input_tokens, t.usage.output_tokens, t.usage.cached_input_tokens]
        totals = [a + b for a, b in zip(totals, [*numbers, t.cost_nanos], strict=True)]
        rows.append([*cells, *(f"{n:,}" for n in numbers), nanos_to_dollars(t.cost_nanos)])
    if len(rows) > 1 and dims:
        rows.append(["TOTAL", *([""] * (len(dims) - 1)), *(f"{n:,}" for n in totals[:4]), nanos_to_dollars(totals[4])])
    print_table(headers, rows, empty="no spend in this range")
    return 0


def cmd_spend_entries(args: argparse.Namespace) -> int:
    """`igw spend entries [--team T] [--limit N]`."""
    if args.limit < 1:
        raise CliError("--limit must be at least 1")
    _check_range(args.since, args.until)
    session = Session(args)
    stub = _ledger_admin(session)
    entries: list[Any] = []
    token = ""
    while len(entries) < args.limit:
        page = stub.ListSpendEntries(
            ledger_pb2.ListSpendEntriesRequest(
                team=args.team,
                start_time=_ts(args.since),
                end_time=_ts(args.until),
                page_size=min(args.limit - len(entries), 1000),
                page_token=token,
            ),
            timeout=session.timeout,
        )
        entries.extend(page.entries)
        token = page.next_page_token
        if not token or not page.entries:
            break
    entries = entries[: args.limit]
    if session.json:
        print_json({"entries": [message_to_dict(e) for e in entries]})
        return 0
    rows = [
        (
            format_timestamp(e.create_time),
            e.request_id,
            e.team,
            e.agent,
            e.model,
            e.provider,
            f"{e.usage.input_tokens:,}",
            f"{e.usage.output_tokens:,}",
            nanos_to_dollars(e.cost_nanos),
            _enum_name(ledger_pb2.CallOutcome, e.outcome, "CALL_OUTCOME_"),
            ",".join(_enum_name(ledger_pb2.SpendFlag, f, "SPEND_FLAG_") for f in e.flags),
        )
        for e in entries
    ]
    print_table(
        ["time", "request", "team", "agent", "model", "provider", "in", "out", "cost", "outcome", "flags"],
        rows,
        empty="no spend entries",
    )
    return 0


# --------------------------------------------------------------------------- audit


def cmd_audit_list(args: argparse.Namespace) -> int:
    """`igw audit list [--team T] [--key K] [--action A] [--limit N]`."""
    if args.limit < 1:
        raise CliError("--limit must be at least 1")
    _check_range(args.since, args.until)
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


# --------------------------------------------------------------------------- router admin


def _router_admin(session: Session) -> router_pb2_grpc.RouterAdminServiceStub:
    return router_pb2_grpc.RouterAdminServiceStub(session.channel("router"))  # type: ignore[no-untyped-call]


def cmd_config_show(args: argparse.Namespace) -> int:
    """`igw config show`."""
    session = Session(args)
    cfg = _router_admin(session).GetConfig(router_pb2.GetConfigRequest(), timeout=session.timeout)
    if session.json:
        print_json(cfg)
        return 0
    rows = [
        ("sha256", cfg.sha256),
        ("pinned", cfg.pinned_sha256 or "-"),
        ("source", cfg.source),
        ("loaded", format_timestamp(cfg.load_time)),
        ("providers", ", ".join(cfg.providers)),
        ("deployments", ", ".join(cfg.deployments)),
        ("aliases", ", ".join(cfg.aliases)),
        ("last reload", f"FAILED: {cfg.last_reload_error}" if cfg.last_reload_error else "ok"),
    ]
    print_table(["field", "value"], rows)
    return 0


def cmd_config_reload(args: argparse.Namespace) -> int:
    """`igw config reload` (a bad file is an error; the old config stays)."""
    session = Session(args)
    response = _router_admin(session).ReloadConfig(router_pb2.ReloadConfigRequest(), timeout=session.timeout)
    if session.json:
        print_json(response)
    elif response.changed:
        print(f"config reloaded: {response.previous_sha256[:12]} -> {response.sha256[:12]}")
    else:
        print(f"config unchanged: {response.sha256[:12]}")
    return 0


def cmd_deployments(args: argparse.Namespace) -> int:
    """`igw deployments`: each deployment with its circuit-breaker state."""
    session = Session(args)
    response = _router_admin(session).ListDeployments(router_pb2.ListDeploymentsRequest(), timeout=session.timeout)
    if session.json:
        print_json(response)
        return 0
    rows = [
        (
            d.name,
            d.provider,
            d.provider_model,
            _enum_name(router_pb2.BreakerState, d.breaker_state, "BREAKER_STATE_"),
            str(d.consecutive_failures),
            format_timestamp(d.open_until),
            str(d.in_flight),
            format_duration(d.observed_latency),
        )
        for d in response.deployments
    ]
    print_table(
        ["name", "provider", "model", "breaker", "failures", "open until", "in flight", "latency"],
        rows,
        empty="no deployments",
    )
    return 0


# --------------------------------------------------------------------------- prices


def cmd_prices_list(args: argparse.Namespace) -> int:
    """`igw prices list [--version N]`."""
    session = Session(args)
    response = _ledger_admin(session).ListPrices(
        ledger_pb2.ListPricesRequest(version=args.version), timeout=session.timeout
    )
    if session.json:
        print_json(response)
        return 0
    rows = [
        (
            p.model,
            nanos_to_dollars(p.input_per_mtok_nanos),
            nanos_to_dollars(p.output_per_mtok_nanos),
            nanos_to_dollars(p.cached_input_per_mtok_nanos) if p.cached_input_per_mtok_nanos else "-",
        )
        for p in response.prices
    ]
    print(f"price catalogue version {response.version} ({format_timestamp(response.create_time)})")
    print_table(["model", "input $/Mtok", "output $/Mtok", "cached $/Mtok"], rows, empty="no prices")
    return 0


def cmd_prices_set(args: argparse.Namespace) -> int:
    """`igw prices set MODEL --input $ --output $ [--cached $]` (dollars per million tokens)."""
    session = Session(args)
    price = ledger_pb2.ModelPrice(
        model=args.model,
        input_per_mtok_nanos=args.input,
        output_per_mtok_nanos=args.output,
        cached_input_per_mtok_nanos=args.cached or 0,
    )
    response = _ledger_admin(session).SetPrices(
        ledger_pb2.SetPricesRequest(request_id=uuid.uuid4().hex, prices=[price]), timeout=session.timeout
    )
    if session.json:
        print_json({"version": int(response.version), "price": message_to_dict(price)})
        return 0
    cached = f", cached {nanos_to_dollars(args.cached)}" if args.cached else ""
    print(
        f"prices set for {args.model}: input {nanos_to_dollars(args.input)}, "
        f"output {nanos_to_dollars(args.output)}{cached} per 1M tokens (catalogue version {response.version})"
    )
    return 0


# --------------------------------------------------------------------------- vault rewrap


def _vault_database_url(state_dir: Path) -> tuple[str, Any]:
    """The vault database of an `igw up` state directory, and a stopper if we started Postgres."""
    env_url = os.environ.get("IGW_KEYVAULT_DATABASE_URL")  # never IGW_DATABASE_URL: that is the ledger's
    if env_url:
        return env_url, None
    pg_dir = state_dir / "pg"
    if not pg_dir.is_dir():
        raise CliError(f"{state_dir} has no embedded Postgres (pg/); pass --database-url")
    from services.common.pg import EmbeddedPostgres

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
