"""Client configuration: router addresses, mTLS files, deadline and retry budget.

Read from arguments, or from ``IGW_*`` environment variables with :meth:`ClientConfig.from_env`
(arguments win). Files are checked when the config is built, so a missing or expired
certificate fails at once with a message that says what to do, not at the first call.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from igw.client._errors import CertificateExpired, ClientConfigError
from igw.client._identity import IDENTITY_CHECKS
from igw.client._spiffe import TlsFiles

__all__ = ["ENV_VARS", "ClientConfig", "Metadata", "certificate_not_after"]

#: The environment variables :meth:`ClientConfig.from_env` reads.
ENV_VARS = (
    "IGW_ROUTER_ADDRS",
    "IGW_TLS_CERT",
    "IGW_TLS_KEY",
    "IGW_TLS_CA",
    "IGW_TRUST_DOMAIN",
    "IGW_ROUTER_SPIFFE_ID",
    "IGW_TIMEOUT",
    "IGW_MAX_ATTEMPTS",
    "IGW_IDENTITY_CHECK",
)

# Long-lived channels: keepalive notices a dead router; no per-call TLS handshakes.
_CHANNEL_OPTIONS: tuple[tuple[str, int | str], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
    ("grpc.max_send_message_length", 32 * 1024 * 1024),
    # Our own retry loop rotates addresses and keeps the request id; grpc's would not.
    ("grpc.enable_retries", 0),
)


def certificate_not_after(path: Path) -> dt.datetime | None:
    """The certificate's notAfter (UTC), or ``None`` when it cannot be read without extra packages.

    Uses the standard library's certificate decoder (``ssl._ssl._test_decode_cert``), which
    takes a PEM file path; it is private API, so any failure degrades to "unknown".
    """
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        info = decode(str(path))
        not_after = info["notAfter"]
        return dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(not_after), tz=dt.UTC)
    except Exception:  # unknown format, no notAfter: let the TLS handshake decide
        return None


def _check_file(what: str, env_var: str, value: Path) -> Path:
    if not value.is_file():
        raise ClientConfigError(
            f"{what} file {value} does not exist (set it with the argument or {env_var})",
            reason="FILE_NOT_FOUND",
        )
    if not os.access(value, os.R_OK):
        raise ClientConfigError(f"{what} file {value} is not readable", reason="FILE_NOT_READABLE")
    return value


#: Call metadata: ``(key, value)`` pairs sent with a call (keys lower case), e.g. ``traceparent``.
Metadata = Sequence[tuple[str, str]] | Mapping[str, str]


def _metadata(value: Metadata | None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata as gRPC wants it (lower-case keys), or None."""
    if not value:
        return None
    items = value.items() if isinstance(value, Mapping) else value
    return tuple((str(k).lower(), str(v)) for k, v in items)


def _split_addresses(value: str | Sequence[str]) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(a.strip() for a in items if a and a.strip())


@dataclass(frozen=True, init=False)
class ClientConfig:
    """Where the router is and how to prove who we are.

    Args:
        addresses: one or more ``host:port`` of router replicas (a list, or a comma-separated
            string); calls rotate across them when one is UNAVAILABLE.
        cert: the agent's client certificate (PEM), carrying its SPIFFE identity.
        key: its private key (PEM).
        ca: the CA that signed the router's certificate (PEM).
        server_id: the SPIFFE id the router's certificate must carry (its one URI SAN); default
            ``spiffe://<trust_domain>/router``. No DNS name is checked or needed.
        trust_domain: used for the default ``server_id`` (default ``igw.local``).
        timeout: the default deadline of a call, in seconds (a call may pass its own).
        max_attempts: how many times a call is tried in all when the router is UNAVAILABLE.
        identity_check: how the router's identity is checked on each connection (``igw.client._identity``):
            ``auto`` (default) uses gRPC's own TLS when the router's certificate also carries the
            identity's DNS name (``router.<trust domain>.spiffe.invalid``, as ``igw pki`` issues),
            else the SPIFFE tunnel; ``uri`` always the tunnel.

    Raises:
        ClientConfigError: no address, a missing file, bad numbers.
        CertificateExpired: the client certificate is past its notAfter.
    """

    addresses: tuple[str, ...]
    cert: Path
    key: Path
    ca: Path
    server_id: str
    timeout: float
    max_attempts: int
    identity_check: str

    def __init__(
        self,
        addresses: Sequence[str] | str,
        cert: str | os.PathLike[str],
        key: str | os.PathLike[str],
        ca: str | os.PathLike[str],
        server_id: str = "",
        timeout: float = 60.0,
        max_attempts: int = 4,
        trust_domain: str = "igw.local",
        identity_check: str = "auto",
    ) -> None:
        addrs = _split_addresses(addresses)
        if not addrs:
            raise ClientConfigError(
                "no router address given (pass addresses=[...] or set IGW_ROUTER_ADDRS=host:port,...)",
                reason="NO_ADDRESS",
            )
        if not timeout > 0:
            raise ClientConfigError(f"timeout must be positive, got {timeout}", reason="BAD_TIMEOUT")
        if max_attempts < 1:
            raise ClientConfigError(f"max_attempts must be at least 1, got {max_attempts}", reason="BAD_MAX_ATTEMPTS")
        if identity_check not in IDENTITY_CHECKS:
            raise ClientConfigError(
                f"identity_check must be one of {', '.join(IDENTITY_CHECKS)}, got {identity_check!r}",
                reason="BAD_IDENTITY_CHECK",
            )
        values = {
            "addresses": addrs,
            "cert": _check_file("client certificate", "IGW_TLS_CERT", Path(cert)),
            "key": _check_file("client key", "IGW_TLS_KEY", Path(key)),
            "ca": _check_file("CA certificate", "IGW_TLS_CA", Path(ca)),
            "server_id": server_id or f"spiffe://{trust_domain}/router",
            "timeout": float(timeout),
            "max_attempts": int(max_attempts),
            "identity_check": identity_check,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)
        self.check_certificate()

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        addresses: Sequence[str] | str | None = None,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        ca: str | os.PathLike[str] | None = None,
        server_id: str | None = None,
        timeout: float | None = None,
        max_attempts: int | None = None,
        identity_check: str | None = None,
    ) -> ClientConfig:
        """Builds a config from ``IGW_*`` variables; any argument given overrides its variable.

        ``IGW_ROUTER_ADDRS`` (comma separated), ``IGW_TLS_CERT``, ``IGW_TLS_KEY``, ``IGW_TLS_CA``,
        ``IGW_ROUTER_SPIFFE_ID`` (default ``spiffe://$IGW_TRUST_DOMAIN/router``, trust domain
        ``igw.local`` unless set), ``IGW_TIMEOUT`` (seconds, default 60),
        ``IGW_MAX_ATTEMPTS`` (default 4), ``IGW_IDENTITY_CHECK`` (``auto`` or ``uri``, default ``auto``).
        """
        source = os.environ if env is None else env

        def need(value: str | os.PathLike[str] | None, var: str, what: str) -> Path:
            if value is not None:
                return Path(value)
            text = source.get(var, "").strip()
            if not text:
                raise ClientConfigError(f"no {what} given (pass it or set {var})", reason="MISSING_SETTING")
            return Path(text)

        def number(var: str, default: float) -> float:
            text = source.get(var, "").strip()
            if not text:
                return default
            try:
                return float(text)
            except ValueError:
                raise ClientConfigError(f"{var}={text!r} is not a number", reason="BAD_SETTING") from None

        addrs = _split_addresses(addresses if addresses is not None else source.get("IGW_ROUTER_ADDRS", ""))
        if not addrs:
            raise ClientConfigError(
                "no router address given (pass addresses=[...] or set IGW_ROUTER_ADDRS=host:port,...)",
                reason="NO_ADDRESS",
            )
        return cls(
            addresses=addrs,
            cert=need(cert, "IGW_TLS_CERT", "client certificate"),
            key=need(key, "IGW_TLS_KEY", "client key"),
            ca=need(ca, "IGW_TLS_CA", "CA certificate"),
            server_id=server_id or source.get("IGW_ROUTER_SPIFFE_ID", "").strip(),
            trust_domain=source.get("IGW_TRUST_DOMAIN", "").strip() or "igw.local",
            timeout=timeout if timeout is not None else number("IGW_TIMEOUT", 60.0),
            max_attempts=max_attempts if max_attempts is not None else int(number("IGW_MAX_ATTEMPTS", 4)),
            identity_check=identity_check or source.get("IGW_IDENTITY_CHECK", "").strip() or "auto",
        )

    def check_certificate(self, now: dt.datetime | None = None) -> None:
        """Raises :class:`CertificateExpired` when the client certificate is past its notAfter."""
        not_after = certificate_not_after(self.cert)
        if not_after is None:
            return
        if (now or dt.datetime.now(dt.UTC)) >= not_after:
            raise CertificateExpired(
                f"client certificate {self.cert} expired at {not_after:%Y-%m-%dT%H:%M:%SZ}; "
                "issue a new one (e.g. `igw pki issue agent TEAM AGENT --dir DIR`)"
            )

    def tls_files(self) -> TlsFiles:
        """Our certificate, key and CA as followed on disk (rotations apply to new connections)."""
        return TlsFiles(self.cert, self.key, self.ca)

    def channel_options(self) -> list[tuple[str, int | str]]:
        """Channel options: keepalive, message sizes."""
        return list(_CHANNEL_OPTIONS)
