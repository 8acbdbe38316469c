"""What the operator commands share: the enum names they accept and argument converters."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from igw.keyvault.v1 import keyvault_pb2
from igw.ledger.v1 import ledger_pb2
from services.cli.parsing import CliError

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

def check_range(since: dt.datetime | None, until: dt.datetime | None) -> None:
    if since is not None and until is not None and since >= until:
        raise CliError("--since must be before --until")
