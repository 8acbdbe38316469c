"""`igw pki init` / `igw pki issue agent|operator`: the development PKI."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from services.cli.output import print_json, print_table
from services.cli.parsing import CliError, SubParsers

__all__ = ["register"]


def register(sub: SubParsers, parent: argparse.ArgumentParser) -> None:
    """Adds `pki` and its subcommands."""
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


def _describe(path: Path) -> tuple[str, str]:
    from services.common import pki

    info = pki.describe_cert(path.read_bytes())
    return ",".join(info.spiffe_ids) or "(CA)", info.not_after.strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_init(args: argparse.Namespace) -> int:
    """`igw pki init --dir DIR`."""
    from services.common import pki

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
    from services.common import pki

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
