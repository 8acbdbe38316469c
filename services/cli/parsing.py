"""What every `igw` command parses: its connection options, amounts of dollars, durations,
points in time and labels, and :class:`CliError`, the one error a user sees without a traceback."""

from __future__ import annotations

import argparse
import datetime as dt
import re
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

from services.common.money import NANOS_PER_DOLLAR

__all__ = [
    "CliError",
    "IgwArgumentParser",
    "SubParsers",
    "common_options",
    "dollars_arg",
    "dollars_to_nanos",
    "duration_arg",
    "label_arg",
    "nanos_to_dollars",
    "parse_duration",
    "parse_time",
    "time_arg",
]

if TYPE_CHECKING:
    SubParsers: TypeAlias = argparse._SubParsersAction[Any]
else:
    SubParsers = argparse._SubParsersAction


class CliError(Exception):
    """A failure the user can fix; printed as one line ``error: ...``, no traceback."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class IgwArgumentParser(argparse.ArgumentParser):
    """argparse with a configurable exit code for usage errors (`igw probe` uses 1, like
    grpc_health_probe; everything else the argparse default 2)."""

    def __init__(self, *args: Any, error_exit_code: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.error_exit_code = error_exit_code

    def error(self, message: str) -> NoReturn:
        self.print_usage()
        self.exit(self.error_exit_code, f"{self.prog}: error: {message}\n")


def common_options(*, plain_key_option: bool = True) -> argparse.ArgumentParser:
    """Options of every command that talks to the gateway (given after the subcommand).

    ``--key`` is also spelled ``--tls-key`` (and ``--cert``/``--ca`` ``--tls-cert``/``--tls-ca``);
    with ``plain_key_option=False`` only ``--tls-key`` exists, for `igw audit list --key NAME`.
    """
    parent = IgwArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument(
        "--endpoints",
        metavar="PATH",
        help="endpoints file of `igw up` (default $IGW_ENDPOINTS or .igw/endpoints.json)",
    )
    group.add_argument("--cert", "--tls-cert", dest="cert", metavar="PATH", help="client certificate")
    key_flags = ("--key", "--tls-key") if plain_key_option else ("--tls-key",)
    group.add_argument(*key_flags, dest="key", metavar="PATH", help="client private key")
    group.add_argument("--ca", "--tls-ca", dest="ca", metavar="PATH", help="CA certificate to trust")
    group.add_argument("--address", metavar="HOST:PORT", help="service address (overrides the endpoints file)")
    group.add_argument("--server-id", metavar="SPIFFE_ID",
                       help="SPIFFE id the service must present (default spiffe://$IGW_TRUST_DOMAIN/<service>, "
                            "trust domain from the endpoints file or igw.local)")
    group.add_argument("--timeout", type=float, metavar="SECONDS", help="deadline of each call (default 30)")
    group.add_argument("--json", action="store_true", help="JSON output for scripts")
    return parent


# --------------------------------------------------------------------------- money


def dollars_to_nanos(text: str) -> int:
    """``"1.50"`` / ``"$1.50"`` -> ``1_500_000_000`` nano-dollars, exactly (Decimal, never float).

    Raises ValueError for negatives, non-numbers and more precision than a nano-dollar.
    """
    cleaned = text.strip().removeprefix("$").replace("_", "").replace(",", "")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        raise ValueError(f"not an amount of dollars: {text!r}") from None
    if not value.is_finite():
        raise ValueError(f"not an amount of dollars: {text!r}")
    if value < 0:
        raise ValueError(f"amount must not be negative: {text!r}")
    nanos = value * NANOS_PER_DOLLAR
    if nanos != nanos.to_integral_value():
        raise ValueError(f"amount {text!r} is finer than a nano-dollar (at most 9 decimal places)")
    return int(nanos)


def nanos_to_dollars(nanos: int | str, *, places: int | None = None) -> str:
    """``1_500_000_000`` -> ``"$1.50"``: exact, at least two decimals, trailing zeros trimmed.

    With ``places``, rounds (half up) to that many decimals, for tables.
    """
    value = Decimal(int(nanos)) / NANOS_PER_DOLLAR
    sign = "-" if value < 0 else ""
    value = abs(value)
    if places is not None:
        return f"{sign}${value.quantize(Decimal(1).scaleb(-places), rounding='ROUND_HALF_UP'):f}"
    text = f"{value:.9f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{sign}${whole}.{frac.ljust(2, '0')}"


def dollars_arg(text: str) -> int:
    """argparse type: dollars -> nano-dollars."""
    try:
        return dollars_to_nanos(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# --------------------------------------------------------------------------- durations and times

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_SECONDS: dict[str, Decimal] = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    "d": Decimal(86400),
    "w": Decimal(604800),
}


def parse_duration(text: str) -> dt.timedelta:
    """``"90d"``, ``"1h"``, ``"1h30m"``, ``"45s"``, ``"2w"`` or plain seconds -> timedelta (> 0)."""
    cleaned = text.strip().lower().replace(" ", "")
    if not cleaned:
        raise ValueError("empty duration")
    if re.fullmatch(r"\d+(?:\.\d+)?", cleaned):
        seconds = Decimal(cleaned)
    else:
        pos = 0
        seconds = Decimal(0)
        for match in _DURATION_RE.finditer(cleaned):
            if match.start() != pos:
                break
            seconds += Decimal(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if pos != len(cleaned):
            raise ValueError(f"not a duration: {text!r} (use e.g. 90d, 12h, 30m, 45s, 1h30m)")
    if seconds <= 0:
        raise ValueError(f"duration must be positive: {text!r}")
    return dt.timedelta(seconds=float(seconds)) if seconds % 1 else dt.timedelta(seconds=int(seconds))


def duration_arg(text: str) -> dt.timedelta:
    """argparse type: a duration."""
    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_time(text: str, *, now: dt.datetime | None = None) -> dt.datetime:
    """A point in time: ``2026-11-01`` (UTC midnight), an ISO 8601 time (UTC when no offset),
    ``now``, or a duration meaning that long ago (``24h``, ``7d``)."""
    ref = now or dt.datetime.now(dt.UTC)
    cleaned = text.strip()
    if cleaned.lower() == "now":
        return ref
    try:
        parsed = dt.datetime.fromisoformat(cleaned.replace("Z", "+00:00"))
    except ValueError:
        try:
            return ref - parse_duration(cleaned)
        except ValueError:
            raise ValueError(
                f"not a time: {text!r} (use 2026-11-01, 2026-11-01T12:00:00Z or a duration ago like 24h)"
            ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def time_arg(text: str) -> dt.datetime:
    """argparse type: a point in time."""
    try:
        return parse_time(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def label_arg(text: str) -> tuple[str, str]:
    """argparse type: ``k=v``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"label must be key=value, got {text!r}")
    return key.strip(), value.strip()
