"""The development verbs: `igw up` (the gateway on one machine) and `igw pki` (the dev CA).

They run code from the dev package ``igw_dev`` (``pip install -e ./dev``; ``make venv`` installs
it), imported only when one of them runs: the runtime, and a container image without the dev
package, never import it. Without it these verbs exit 2 and say how to install it.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING

from services.cli.output import print_json, print_table
from services.cli.parsing import CliError, SubParsers

if TYPE_CHECKING:
    from types import ModuleType

__all__ = ["dev_package_missing", "register"]


def dev_package_missing(what: str, err: ModuleNotFoundError) -> CliError:
    """The error when ``what`` runs where the dev package (or one of its dependencies) is missing."""
    return CliError(
        f"{what} needs the development package igw-dev (missing module {err.name}); "
        "from a checkout of igw: `pip install -e ./dev` (`make venv` does it)"
    )


def _dev_pki(verb: str) -> ModuleType:
    try:
        from igw_dev import pki
    except ModuleNotFoundError as err:
        raise dev_package_missing(f"`igw {verb}` (the development CA)", err) from None
    return pki


def register(sub: SubParsers, parent: argparse.ArgumentParser) -> None:
    """Adds `pki` and its subcommands, and `up`."""
    pki = sub.add_parser("pki", help="development CA and certificates")
    pki_sub = pki.add_subparsers(dest="pki_command", required=True, metavar="{init,issue}")

    init = pki_sub.add_parser(
        "init",
        parents=[parent],
        help="create (or refresh) the dev CA and the router, keyvault, ledger, operator and demo agent certs",
    )
    init.add_argument("--dir", required=True, type=Path, help="directory for the PEM files")
    init.add_argument("--days", type=int, default=7, help="validity of leaf certificates in days (default 7)")
    init.add_argument("--trust-domain", default="igw.local", help="SPIFFE trust domain (default igw.local)")
    init.set_defaults(func=cmd_init)

    issue = pki_sub.add_parser("issue", help="issue one more certificate from the dev CA")
    issue_sub = issue.add_subparsers(dest="kind", required=True, metavar="{agent,operator}")
    agent = issue_sub.add_parser("agent", parents=[parent], help="spiffe://<td>/team/TEAM/agent/AGENT")
    agent.add_argument("team")
    agent.add_argument("agent")
    operator = issue_sub.add_parser("operator", parents=[parent], help="spiffe://<td>/operator/NAME")
    operator.add_argument("name")
    for p in (agent, operator):
        p.add_argument("--dir", required=True, type=Path, help="the directory holding ca.pem / ca-key.pem")
        p.add_argument("--days", type=int, default=7, help="validity in days (default 7)")
        p.add_argument("--trust-domain", default="igw.local", help="SPIFFE trust domain (default igw.local)")
        p.set_defaults(func=cmd_issue)
    _register_up(sub)


def _describe(path: Path) -> tuple[str, str]:
    from services.common.pki import describe_cert

    info = describe_cert(path.read_bytes())
    return ",".join(info.spiffe_ids) or "(CA)", info.not_after.strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_init(args: argparse.Namespace) -> int:
    """`igw pki init --dir DIR`."""
    pki = _dev_pki("pki init")

    if args.days < 1:
        raise CliError("--days must be at least 1")
    try:
        paths = pki.init_dev_pki(args.dir, trust_domain=args.trust_domain, valid_for_days=args.days)
    except (pki.PkiError, ValueError, OSError) as err:
        raise CliError(f"cannot create the PKI in {args.dir}: {err}") from None
    rows = []
    for name, path in [("ca", paths.ca_cert), *((n, kp.cert) for n, kp in paths.leaves().items())]:
        identity, not_after = _describe(path)
        rows.append((name, identity, not_after, str(path)))
    if args.json:
        print_json(
            {
                "directory": str(paths.directory),
                "ca_created": paths.ca_created,
                "issued": list(paths.issued),
                "certificates": [{"name": n, "spiffe_id": i, "not_after": a, "path": p} for n, i, a, p in rows],
            }
        )
        return 0
    print_table(["name", "identity", "expires", "path"], rows)
    fresh = ", ".join(paths.issued) if paths.issued else "nothing (all still valid)"
    print(f"\n{'created a new CA; ' if paths.ca_created else ''}issued: {fresh}")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    """`igw pki issue agent TEAM AGENT` / `igw pki issue operator NAME`."""
    pki = _dev_pki("pki issue")

    names = (args.team, args.agent) if args.kind == "agent" else (args.name,)
    if args.days < 1:
        raise CliError("--days must be at least 1")
    try:
        cert, key = pki.issue_to_dir(
            args.dir,
            args.kind,
            *names,
            trust_domain=args.trust_domain,
            valid_for=dt.timedelta(days=args.days),
        )
    except FileNotFoundError as err:
        raise CliError(str(err)) from None
    except (pki.PkiError, ValueError, OSError) as err:
        raise CliError(f"cannot issue the certificate: {err}") from None
    identity, not_after = _describe(cert)
    if args.json:
        print_json({"spiffe_id": identity, "not_after": not_after, "cert": str(cert), "key": str(key)})
        return 0
    print(f"issued {identity} (expires {not_after})")
    print(f"  cert: {cert}\n  key:  {key}")
    return 0


def _register_up(sub: SubParsers) -> None:
    p = sub.add_parser("up", help="start router, keyvault and ledger locally (Ctrl-C stops them)")
    p.add_argument("--state-dir", default=".igw", help="where certificates, data and logs live")
    p.add_argument("--demo", dest="demo", action="store_true", default=True, help="start the fake providers (default)")
    p.add_argument("--no-demo", dest="demo", action="store_false", help="no fake providers; needs --config")
    p.add_argument("--ports", choices=["fixed", "auto"], default="fixed", help="fixed well-known ports or any free")
    p.add_argument("--config", default=None, help="routing config (YAML); default: the demo config")
    p.add_argument("--router-workers", type=int, default=None,
                   help="router worker processes per router, on one port (IGW_ROUTER_WORKERS); default 1")
    p.add_argument("--replicas", type=int, default=1,
                   help="routers, ledgers and keyvaults to start (each N; one Postgres); default 1")
    p.set_defaults(func=cmd_up)


def cmd_up(args: argparse.Namespace) -> int:
    """`igw up`: the whole gateway on one machine, until Ctrl-C."""
    try:
        from igw_dev.up import run_up
    except ModuleNotFoundError as err:
        raise dev_package_missing("`igw up` (the gateway on one machine, for development)", err) from None
    return int(run_up(args) or 0)
