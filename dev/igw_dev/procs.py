"""Start igw services as separate processes and wait until they are ready.

Used by ``igw up``, the end-to-end tests and the benchmark. Each service gets its
own environment; it binds port 0 unless told otherwise and reports the ports it
bound through ``IGW_READY_FILE``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


class ServiceStartError(RuntimeError):
    """A service exited or did not become ready in time."""


@dataclass
class ServiceProcess:
    """A running service process and the ports it bound."""

    name: str
    proc: subprocess.Popen[bytes]
    grpc_port: int
    probe_port: int
    metrics_port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    http_port: int = 0  # the router's HTTPS edge, when it serves one

    @property
    def address(self) -> str:
        """``127.0.0.1:<grpc_port>``."""
        return f"127.0.0.1:{self.grpc_port}"

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL (a crash)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def log_text(self) -> str:
        """Everything the process wrote to stderr/stdout so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def tls_env(pki_dir: Path, name: str) -> dict[str, str]:
    """IGW_TLS_* for a service whose cert files are ``<pki_dir>/<name>.pem`` / ``-key.pem``."""
    return {
        "IGW_TLS_CERT": str(pki_dir / f"{name}.pem"),
        "IGW_TLS_KEY": str(pki_dir / f"{name}-key.pem"),
        "IGW_TLS_CA": str(pki_dir / "ca.pem"),
    }


def start_service(
    name: str,
    env: Mapping[str, str],
    state_dir: Path,
    *,
    module: str | None = None,
    timeout: float = 30.0,
    log_file: IO[bytes] | None = None,
) -> ServiceProcess:
    """Starts ``python -m services.<name>`` and waits for its ready file."""
    state_dir.mkdir(parents=True, exist_ok=True)
    ready = state_dir / f"{name}.ready.json"
    ready.unlink(missing_ok=True)
    log_path = state_dir / f"{name}.log"
    full_env = {**os.environ, **env, "IGW_READY_FILE": str(ready), "PYTHONUNBUFFERED": "1"}
    out = log_file if log_file is not None else open(log_path, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", module or f"services.{name}"],
        env=full_env,
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log_path.read_text(errors="replace")[-4000:] if log_path.exists() else ""
            raise ServiceStartError(f"{name} exited with {proc.returncode}:\n{text}")
        if ready.exists():
            info = json.loads(ready.read_text())
            return ServiceProcess(
                name, proc, info["grpc_port"], info["probe_port"], info["metrics_port"], log_path, dict(env),
                info.get("http_port", 0),
            )
        time.sleep(0.05)
    proc.kill()
    raise ServiceStartError(f"{name} did not become ready within {timeout}s")
