"""Certificates minted per test for the identity checks (router upstreams, the agents' client)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from igw_dev.pki import generate_ca, issue_cert


def new_ca(d: Path) -> Callable[..., None]:
    """Writes a fresh CA to ``d/ca.pem`` (key ``d/ca-key.pem``) and returns ``mint(stem, spiffe_id,
    **issue_cert options)``, which writes ``d/<stem>.pem`` and ``d/<stem>-key.pem`` (no IP SAN)."""
    ca = generate_ca()
    (d / "ca.pem").write_bytes(ca[0])
    (d / "ca-key.pem").write_bytes(ca[1])

    def mint(stem: str, spiffe_id: str, **kw: object) -> None:
        cert, key = issue_cert(ca[0], ca[1], spiffe_id, ip_addresses=(), **kw)  # type: ignore[arg-type]
        (d / f"{stem}.pem").write_bytes(cert)
        (d / f"{stem}-key.pem").write_bytes(key)

    return mint
