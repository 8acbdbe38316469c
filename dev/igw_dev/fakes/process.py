"""A fake provider in this event loop (FakeHandle) or in its own process (FakeProcess)."""


from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from .common import STATE_KEY, FakeState, FaultRule, base_url_for
from .server import build_app

# --------------------------------------------------------------------------- in-process handle


@dataclass
class FakeHandle:
    """A fake provider running in the current event loop."""

    kind: str
    host: str
    port: int
    app: web.Application
    _runner: web.AppRunner

    @property
    def base_url(self) -> str:
        """Base URL as the adapter for ``kind`` expects it."""
        return base_url_for(self.kind, self.host, self.port)

    @property
    def root_url(self) -> str:
        """``http://host:port`` (control API lives here)."""
        return f"http://{self.host}:{self.port}"

    @property
    def state(self) -> FakeState:
        """Direct access to the fake's state (rules, recorded requests, stats)."""
        return self.app[STATE_KEY]

    async def close(self) -> None:
        """Stop the server."""
        await self._runner.cleanup()


async def start_fake(
    kind: str,
    *,
    api_key: str | None = None,
    delay_ms: int = 0,
    host: str = "127.0.0.1",
    port: int = 0,
    chunk_delay_ms: int = 0,
    faults: Iterable[FaultRule] = (),
) -> FakeHandle:
    """Start a fake provider in this event loop; ``port=0`` picks a free port."""
    app = build_app(kind, api_key=api_key, delay_ms=delay_ms, chunk_delay_ms=chunk_delay_ms, faults=faults)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    site = web.SockSite(runner, sock, backlog=2048)
    await site.start()
    bound = sock.getsockname()[1]
    return FakeHandle(kind=kind, host=host, port=bound, app=app, _runner=runner)


async def run_forever(handle_factory: Callable[[], Awaitable[FakeHandle]], stop: asyncio.Event) -> None:
    """Start a fake and keep it up until ``stop`` is set."""
    handle = await handle_factory()
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await handle.close()


# --------------------------------------------------------------------------- subprocess helper


class FakeProcess:
    """A fake provider in a child process (``python -m igw_dev.fakes``), for e2e tests."""

    def __init__(
        self, kind: str, host: str, port: int, proc: subprocess.Popen[bytes], port_file: Path
    ) -> None:
        self.kind = kind
        self.host = host
        self.port = port
        self.proc = proc
        self._port_file = port_file

    @property
    def base_url(self) -> str:
        """Base URL as the adapter for ``kind`` expects it."""
        return base_url_for(self.kind, self.host, self.port)

    @property
    def root_url(self) -> str:
        """``http://host:port`` (control API lives here)."""
        return f"http://{self.host}:{self.port}"

    @classmethod
    def start(
        cls,
        kind: str,
        *,
        api_key: str | None = None,
        delay_ms: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: list[dict[str, Any]] | None = None,
        startup_timeout_s: float = 15.0,
        python: str | None = None,
    ) -> FakeProcess:
        """Spawn the fake and wait until it is listening and healthy."""
        fd, name = tempfile.mkstemp(prefix="igw-fake-", suffix=".port")
        os.close(fd)
        port_file = Path(name)
        port_file.unlink()
        root = Path(__file__).resolve().parents[2]
        cmd = [
            python or sys.executable,
            "-m",
            "igw_dev.fakes",
            "--kind",
            kind,
            "--host",
            host,
            "--port",
            str(port),
            "--delay-ms",
            str(delay_ms),
            "--port-file",
            str(port_file),
        ]
        if faults:
            cmd += ["--fault", json.dumps(faults)]
        env = dict(os.environ)
        env.pop("IGW_FAKE_API_KEY", None)
        if api_key is not None:
            env["IGW_FAKE_API_KEY"] = api_key  # not on the command line, where `ps` would show it
        env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.Popen(cmd, cwd=str(root), env=env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + startup_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"fake {kind} exited with {proc.returncode}")
            if port_file.exists():
                text = port_file.read_text().strip()
                if text:
                    handle = cls(kind, host, int(text), proc, port_file)
                    if handle._healthy():
                        return handle
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        raise TimeoutError(f"fake {kind} did not start")

    def _healthy(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as conn:
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return conn.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate the child (SIGTERM, then SIGKILL)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            self._port_file.unlink()

    def __enter__(self) -> FakeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
