"""The whole gateway, started once per session as real processes (`igw up --ports auto`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Gateway:
    """Addresses and certificate paths of a running gateway."""

    endpoints: dict[str, object]
    state_dir: Path
    proc: subprocess.Popen[bytes]
    ledger_url: str = ""

    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    def addr(self, service: str) -> str:
        return str(self.endpoints[service])

    def channel(self, service: str, cert: str = "operator-admin") -> grpc.Channel:
        """A sync mTLS channel to ``service`` presenting ``<pki>/<cert>.pem``."""
        return mtls_channel(self.addr(service), self.pki, cert)

    def log(self, name: str) -> str:
        path = self.state_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def all_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.state_dir.glob("*.log"))


def mtls_channel(addr: str, pki: Path, cert: str, *, ca: Path | None = None, key: str | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        (ca or pki / "ca.pem").read_bytes(),
        (pki / f"{key or cert}-key.pem").read_bytes(),
        (pki / f"{cert}.pem").read_bytes(),
    )
    return grpc.secure_channel(addr, creds, options=(("grpc.ssl_target_name_override", "localhost"),))


def start_gateway(
    state_dir: Path, pg: object, extra_env: dict[str, str] | None = None, args: tuple[str, ...] = (),
) -> Gateway:
    """Runs `python -m services.cli.main up --ports auto` and waits for endpoints.json."""
    suffix = uuid.uuid4().hex[:8]
    pg.create_database(f"ledger_{suffix}")  # type: ignore[attr-defined]
    pg.create_database(f"vault_{suffix}")  # type: ignore[attr-defined]
    env = {
        **os.environ,
        "IGW_DATABASE_URL": pg.url(f"ledger_{suffix}"),  # type: ignore[attr-defined]
        "IGW_LEDGER_DATABASE_URL": pg.url(f"ledger_{suffix}"),  # type: ignore[attr-defined]
        "IGW_KEYVAULT_DATABASE_URL": pg.url(f"vault_{suffix}"),  # type: ignore[attr-defined]
        **(extra_env or {}),
    }
    state_dir.mkdir(parents=True, exist_ok=True)
    log = open(state_dir / "up.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "up", "--state-dir", str(state_dir), "--ports", "auto", *args],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    endpoints = state_dir / "endpoints.json"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("igw up exited:\n" + (state_dir / "up.log").read_text()[-5000:])
        if endpoints.exists():
            return Gateway(json.loads(endpoints.read_text()), state_dir, proc,
                           pg.url(f"ledger_{suffix}"))  # type: ignore[attr-defined]
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("igw up did not come up:\n" + (state_dir / "up.log").read_text()[-5000:])


def stop_gateway(gw: Gateway) -> int:
    if gw.proc.poll() is None:
        gw.proc.send_signal(signal.SIGTERM)
        try:
            gw.proc.wait(60)
        except subprocess.TimeoutExpired:
            gw.proc.kill()
            gw.proc.wait(5)
    return gw.proc.returncode


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory, pg: object) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("gw"), pg)
    try:
        yield gw
    finally:
        stop_gateway(gw)
