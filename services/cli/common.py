"""What every `igw` command shares: argument parsing of money, durations and times, the
endpoints file written by `igw up`, certificate checks and mTLS channels."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

import grpc

__all__ = [
    "CliError",
    "Endpoints",
    "IgwArgumentParser",
    "Session",
    "SubParsers",
    "TlsFiles",
    "check_cert_files",
    "common_options",
    "dollars_to_nanos",
    "load_endpoints",
    "mtls_channel",
    "nanos_to_dollars",
    "parse_duration",
    "parse_time",
]

if TYPE_CHECKING:
    SubParsers: TypeAlias = argparse._SubParsersAction[Any]
else:
    SubParsers = argparse._SubParsersAction

NANOS_PER_DOLLAR = 1_000_000_000
DEFAULT_ENDPOINTS = Path(".igw") / "endpoints.json"


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


# --------------------------------------------------------------------------- endpoints and certificates


@dataclass(frozen=True)
class TlsFiles:
    """A certificate, its key and the CA to trust."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class Endpoints:
    """The endpoints file written by `igw up` (addresses and certificate paths)."""

    path: Path
    router: str = ""
    keyvault: str = ""
    ledger: str = ""
    probes: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, str] = field(default_factory=dict)
    ca: str = ""
    operator_cert: str = ""
    operator_key: str = ""
    agent_cert: str = ""
    agent_key: str = ""
    state_dir: str = ""
    trust_domain: str = "igw.local"
    raw: Mapping[str, Any] = field(default_factory=dict)

    def address(self, service: str) -> str:
        """The mTLS address of ``router``, ``keyvault`` or ``ledger``."""
        value = str(getattr(self, service, "") or "")
        if not value:
            raise CliError(f"endpoints file {self.path} has no address for {service}")
        return value.split(",")[0].strip()

    def addresses(self, service: str) -> list[str]:
        """Every address of ``service`` (the router may list several, comma separated)."""
        return [a.strip() for a in self.address_list_text(service).split(",") if a.strip()]

    def address_list_text(self, service: str) -> str:
        value = self.raw.get(f"{service}_addresses") or getattr(self, service, "")
        if isinstance(value, list):
            return ",".join(str(v) for v in value)
        return str(value or "")


def endpoints_path(arg: str | None, env: Mapping[str, str] | None = None) -> Path:
    """``--endpoints``, else ``$IGW_ENDPOINTS``, else ``.igw/endpoints.json``."""
    source = os.environ if env is None else env
    return Path(arg or source.get("IGW_ENDPOINTS") or DEFAULT_ENDPOINTS)


def load_endpoints(path: Path) -> Endpoints:
    """Reads the endpoints file; a clear CliError (exit 2) when it is missing or unreadable."""
    if not path.is_file():
        raise CliError(
            f"endpoints file {path} not found: start the gateway with `igw up` "
            "(or pass --endpoints PATH / set IGW_ENDPOINTS)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CliError(f"endpoints file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise CliError(f"endpoints file {path} is not a JSON object")

    def text(key: str) -> str:
        value = data.get(key, "")
        if isinstance(value, list):
            return ",".join(str(v) for v in value)
        return str(value) if value is not None else ""

    def mapping(key: str) -> dict[str, str]:
        value = data.get(key) or {}
        return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}

    return Endpoints(
        path=path,
        router=text("router"),
        keyvault=text("keyvault"),
        ledger=text("ledger"),
        probes=mapping("probes"),
        metrics=mapping("metrics"),
        ca=text("ca"),
        operator_cert=text("operator_cert"),
        operator_key=text("operator_key"),
        agent_cert=text("agent_cert"),
        agent_key=text("agent_key"),
        state_dir=text("state_dir"),
        trust_domain=text("trust_domain") or "igw.local",
        raw=data,
    )


def check_cert_files(files: TlsFiles) -> TlsFiles:
    """Fails with one clear line when a file is missing or the certificate has expired."""
    for what, path in (("certificate", files.cert), ("key", files.key), ("CA certificate", files.ca)):
        if not str(path):
            raise CliError(f"no {what} given (pass --cert/--key/--ca or use an endpoints file that has them)")
        if not path.is_file():
            raise CliError(f"{what} file {path} not found")
    from services.common import pki

    for path in (files.cert, files.ca):
        try:
            pki.check_not_expired(path)
        except pki.PkiError as err:
            raise CliError(str(err)) from None
        except ValueError as err:
            raise CliError(f"{path} is not a PEM certificate: {err}") from None
    return files


_TUNNELS: list[Any] = []


def mtls_channel(address: str, files: TlsFiles, expected_id: str) -> grpc.Channel:
    """A blocking mTLS channel presenting ``files.cert``, trusting only ``files.ca``, and refusing
    any server whose certificate does not carry ``expected_id`` as its SPIFFE id."""
    from igw.client._spiffe import TlsFiles as Files
    from igw.client._spiffe import TunnelThread

    if not _TUNNELS:
        _TUNNELS.append(TunnelThread())
    tunnel = _TUNNELS[0].open(address, expected_id, Files(files.cert, files.key, files.ca))
    options = [
        ("grpc.default_authority", address),
        ("grpc.max_receive_message_length", 32 * 1024 * 1024),
        ("grpc.primary_user_agent", "igw-cli/0.1"),
    ]
    return grpc.insecure_channel(tunnel.target, options)


def close_tunnels() -> None:
    """Stops the CLI's TLS tunnels (after its channels are closed)."""
    while _TUNNELS:
        _TUNNELS.pop().close()


# --------------------------------------------------------------------------- a command's connections


class Session:
    """Lazily loads the endpoints file and opens the channels one command needs."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._endpoints: Endpoints | None = None
        self._channels: list[grpc.Channel] = []

    @property
    def timeout(self) -> float:
        """The deadline of each RPC, in seconds."""
        return float(getattr(self.args, "timeout", None) or 30.0)

    @property
    def json(self) -> bool:
        """True when the user asked for JSON output."""
        return bool(getattr(self.args, "json", False))

    def endpoints(self) -> Endpoints:
        """The endpoints file (loaded once)."""
        if self._endpoints is None:
            self._endpoints = load_endpoints(endpoints_path(getattr(self.args, "endpoints", None)))
        return self._endpoints

    def _need_endpoints(self) -> bool:
        a = self.args
        return not (getattr(a, "cert", None) and getattr(a, "key", None) and getattr(a, "ca", None))

    def tls(self, role: str) -> TlsFiles:
        """The certificate of ``role`` (``agent`` or ``operator``): --cert/--key/--ca, else the endpoints file."""
        a = self.args
        ep = self.endpoints() if self._need_endpoints() else None

        def pick(arg: str | None, key: str) -> Path:
            if arg:
                return Path(arg)
            value = str(getattr(ep, key, "") or "") if ep is not None else ""
            if not value:
                path = ep.path if ep is not None else "(none)"
                raise CliError(f"endpoints file {path} has no {key}; pass --{key.split('_')[-1]}")
            return Path(value)

        files = TlsFiles(
            cert=pick(getattr(a, "cert", None), f"{role}_cert"),
            key=pick(getattr(a, "key", None), f"{role}_key"),
            ca=pick(getattr(a, "ca", None), "ca"),
        )
        return check_cert_files(files)

    def trust_domain(self) -> str:
        """$IGW_TRUST_DOMAIN, else the endpoints file's, else igw.local."""
        explicit = os.environ.get("IGW_TRUST_DOMAIN", "").strip()
        if explicit:
            return explicit
        if self._endpoints is not None:
            return self._endpoints.trust_domain
        return "igw.local"

    def server_id(self, service: str) -> str:
        """The SPIFFE id ``service`` must present: --server-id, else spiffe://<trust domain>/<service>."""
        explicit = getattr(self.args, "server_id", None)
        return str(explicit) if explicit else f"spiffe://{self.trust_domain()}/{service}"

    def address(self, service: str) -> str:
        """``--address``, else the service's address from the endpoints file."""
        explicit = getattr(self.args, "address", None)
        return str(explicit) if explicit else self.endpoints().address(service)

    def channel(self, service: str, role: str = "operator") -> grpc.Channel:
        """An mTLS channel to ``service`` with the ``role`` certificate."""
        address = self.address(service)
        files = self.tls(role)
        channel = mtls_channel(address, files, self.server_id(service))
        self._channels.append(channel)
        return channel

    def close(self) -> None:
        """Closes every channel opened."""
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        close_tunnels()
