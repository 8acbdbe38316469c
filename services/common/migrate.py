"""``python -m services.common.migrate ledger|keyvault``: bring one database to the head schema, then exit.

The one-off migration step for deployments (a Kubernetes Job, a job container), run before new
replicas start; the services then run with ``IGW_LEDGER_MIGRATE=false`` / ``IGW_VAULT_MIGRATE=false``.
The database URL comes from ``IGW_DATABASE_URL`` (as for the service itself) and is never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from alembic.script import ScriptDirectory

from services.common.db import alembic_config, upgrade

COMPONENTS = ("ledger", "keyvault")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``alembic upgrade`` for one component; exit 0 on success, 1 on failure, 2 on bad usage."""
    parser = argparse.ArgumentParser(prog="python -m services.common.migrate", description=__doc__)
    parser.add_argument("component", choices=COMPONENTS)
    parser.add_argument("--revision", default="head", help="target revision (default: head)")
    args = parser.parse_args(argv)
    url = os.environ.get("IGW_DATABASE_URL", "")
    if not url:
        print("IGW_DATABASE_URL is required", file=sys.stderr)
        return 2
    try:
        upgrade(args.component, url, args.revision)
    except Exception as err:  # the message may carry the URL: name the error only
        print(json.dumps({"component": args.component, "migrated": False, "error": type(err).__name__}),
              file=sys.stderr)
        return 1
    head = ScriptDirectory.from_config(alembic_config(args.component, url)).get_current_head()
    print(json.dumps({"component": args.component, "migrated": True, "revision": args.revision, "head": head}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
