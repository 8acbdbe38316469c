"""Operator commands, with the operator certificate: the argument parsers of every group.

The commands themselves live by the service they talk to: ``admin_vault`` (keys, audit, rewrap),
``admin_ledger`` (budgets, rate limits, spend, prices) and ``admin_router`` (config, deployments).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from services.cli.admin_common import (
    AUDIT_ACTIONS,
    AUDIT_OUTCOMES,
    WINDOWS,
    group_by_arg,
)
from services.cli.admin_ledger import (
    cmd_budgets_delete,
    cmd_budgets_get,
    cmd_budgets_list,
    cmd_budgets_set,
    cmd_limits_get,
    cmd_limits_set,
    cmd_prices_list,
    cmd_prices_set,
    cmd_spend,
    cmd_spend_entries,
)
from services.cli.admin_router import (
    cmd_config_reload,
    cmd_config_show,
    cmd_deployments,
)
from services.cli.admin_vault import (
    cmd_audit_list,
    cmd_audit_verify,
    cmd_keys_create,
    cmd_keys_disable,
    cmd_keys_import_env,
    cmd_keys_list,
    cmd_keys_rotate,
    cmd_vault_rewrap,
    read_secret,
)
from services.cli.parsing import SubParsers, common_options, dollars_arg, duration_arg, label_arg, time_arg

__all__ = ["group_by_arg", "read_secret", "register"]


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
