"""Several router worker processes on one port (``IGW_ROUTER_WORKERS`` > 1).

A router is CPU-bound on one core (one asyncio loop, one gRPC server). With N workers the
parent process only supervises: it reserves the gRPC and probe ports (a bound, never listening
socket with ``SO_REUSEPORT``, so a port chosen as 0 is the same for every worker and no other
program can take it between restarts), starts N ``python -m services.router`` workers that bind
those ports with ``SO_REUSEPORT`` (the kernel spreads new connections over them), and writes one
ready file once every worker is serving. Each worker is a complete router: its own ledger and
vault connections, settle batches and budget slices (as router replicas are; the ledger's rules
keep the budget exact across any number of them), and its own metrics port (the configured
one plus the worker's index, or a free one when it is 0).

Signals are passed on (SIGTERM/SIGINT drain every worker, SIGHUP reloads each one's config). If
one worker exits, the others are stopped and the supervisor exits with its status, so the
orchestrator restarts the whole router (one half-alive router on a port would be worse).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

from services.common.server import parse_listen

_READY_TIMEOUT_S = 60.0
_STOP_GRACE_S = 30.0


def workers_of(env: Mapping[str, str]) -> int:
    """How many worker processes the router runs (``IGW_ROUTER_WORKERS``, default 1)."""
    raw = env.get("IGW_ROUTER_WORKERS", "1").strip() or "1"
    try:
        n = int(raw)
    except ValueError:
        raise SystemExit(f"IGW_ROUTER_WORKERS must be a whole number, not {raw!r}") from None
    if not 1 <= n <= 64:
        raise SystemExit("IGW_ROUTER_WORKERS must be 1 to 64")
    return n


def reserve_port(listen: str) -> tuple[socket.socket, str]:
    """Binds ``host:port`` with SO_REUSEPORT without listening; returns the socket and the bound address."""
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host.strip("[]"), port))
    return sock, f"{host}:{sock.getsockname()[1]}"


def _metrics_listen(listen: str, index: int) -> str:
    host, port = parse_listen(listen)
    return f"{host}:{port + index if port else 0}"


def supervise(n: int, env: Mapping[str, str] | None = None) -> int:
    """Runs ``n`` router workers on one port until a signal or a worker's exit; returns the exit status."""
    e = dict(os.environ if env is None else env)
    grpc_sock, listen = reserve_port(e.get("IGW_LISTEN", "127.0.0.1:0"))
    probe_sock, probe_listen = reserve_port(e.get("IGW_PROBE_LISTEN", "127.0.0.1:0"))
    ready = e.get("IGW_READY_FILE", "")
    procs: list[subprocess.Popen[bytes]] = []
    readies: list[Path | None] = []
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        for i in range(n):
            wready = Path(f"{ready}.worker{i}") if ready else None
            if wready is not None:
                wready.unlink(missing_ok=True)
            readies.append(wready)
            wenv = {
                **e, "IGW_ROUTER_WORKERS": "1", "IGW_ROUTER_WORKER_INDEX": str(i), "IGW_REUSE_PORT": "1",
                "IGW_LISTEN": listen, "IGW_PROBE_LISTEN": probe_listen,
                "IGW_METRICS_LISTEN": _metrics_listen(e.get("IGW_METRICS_LISTEN", "127.0.0.1:0"), i),
            }
            wenv.pop("IGW_READY_FILE", None)
            if wready is not None:
                wenv["IGW_READY_FILE"] = str(wready)
            procs.append(subprocess.Popen([sys.executable, "-m", "services.router"], env=wenv))
        if ready:
            infos = _wait_ready(procs, readies)
            if infos is None:
                stopping = True
                return _stop(procs, 1)
            first = infos[0]
            tmp = Path(ready).with_suffix(".tmp")
            tmp.write_text(json.dumps({
                "service": "router", "pid": os.getpid(), "grpc_port": first["grpc_port"],
                "probe_port": first["probe_port"], "metrics_port": first["metrics_port"],
                "workers": [{"pid": w["pid"], "metrics_port": w["metrics_port"]} for w in infos],
            }))
            tmp.replace(ready)
        while True:
            for p in procs:
                code = p.poll()
                if code is not None:
                    return _stop(procs, 0 if stopping and code == 0 else (code or 1))
            time.sleep(0.2)
    finally:
        grpc_sock.close()
        probe_sock.close()


def _wait_ready(procs: list[subprocess.Popen[bytes]], readies: list[Path | None]) -> list[dict[str, int]] | None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return None
        if all(r is not None and r.exists() for r in readies):
            return [json.loads(r.read_text()) for r in readies if r is not None]
        time.sleep(0.05)
    return None


def _stop(procs: list[subprocess.Popen[bytes]], code: int) -> int:
    """Stops every worker still running (SIGTERM, then SIGKILL after the grace); returns ``code``."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE_S
    for p in procs:
        try:
            p.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return code
