"""How an `igw` command reaches the gateway: the endpoints file written by `igw up`,
certificate checks, mTLS channels, and the :class:`Session` that opens what one command needs."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services.cli.parsing import CliError

__all__ = [
    "Endpoints",
    "Session",
    "TlsFiles",
    "check_cert_files",
    "endpoints_path",
    "load_endpoints",
    "mtls_channel",
]

DEFAULT_ENDPOINTS = Path(".igw") / "endpoints.json"


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
