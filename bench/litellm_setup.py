"""LiteLLM proxy side by side: its own venv, a config pointing at the same fake, started offline.

``bench/.litellm-venv`` (gitignored) gets ``litellm[proxy]==1.80.17`` from PyPI once. The
proxy runs with no database, no callbacks, telemetry off, the bundled model-cost map
(``LITELLM_LOCAL_MODEL_COST_MAP``) and ``LITELLM_LOG=ERROR``, so it never reaches out.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LITELLM_VERSION = "1.80.17"
ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".litellm-venv"


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def installed_version() -> str | None:
    """The LiteLLM version in the bench venv, or None."""
    py = _venv_python()
    if not py.exists():
        return None
    res = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                         capture_output=True, text=True, timeout=120)
    return res.stdout.strip() or None if res.returncode == 0 else None


def ensure_venv(log: Any = print) -> str:
    """Creates the venv and installs LiteLLM when missing; returns the installed version."""
    version = installed_version()
    if version == LITELLM_VERSION:
        return version
    log(f"installing litellm[proxy]=={LITELLM_VERSION} into {VENV} (one time; a few minutes)")
    if not _venv_python().exists():
        base = os.environ.get("IGW_BENCH_BASE_PYTHON") or getattr(sys, "_base_executable", None) or sys.executable
        subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(_venv_python()), "-m", "pip", "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"],
                   check=True)
    version = installed_version()
    if version != LITELLM_VERSION:
        raise RuntimeError(f"litellm install gave version {version!r}")
    return version


def write_config(path: Path, models: dict[str, tuple[str, str]]) -> str:
    """Writes a proxy config: ``models`` maps a model name to (api_base, api_key). Returns its text."""
    lines = ["# LiteLLM proxy config written by bench/litellm_setup.py: the same fakes igw calls.", "model_list:"]
    for name, (api_base, api_key) in models.items():
        lines += [
            f"  - model_name: {name}",
            "    litellm_params:",
            "      model: openai/fake-small",
            f"      api_base: {api_base}",
            f"      api_key: {api_key}",
        ]
    lines += [
        "litellm_settings:",
        "  telemetry: false",
        "  drop_params: true",
        "  callbacks: []",
        "  success_callback: []",
        "  failure_callback: []",
        "  set_verbose: false",
        "  json_logs: false",
        "  request_timeout: 30",
        "general_settings:",
        "  disable_spend_logs: true",
        "  disable_error_logs: true",
        "",
    ]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiteLLMProxy:
    """A running LiteLLM proxy."""

    proc: subprocess.Popen[bytes]
    port: int
    version: str
    config_text: str
    config_sha256: str
    workers: int
    command: list[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def info(self) -> dict[str, Any]:
        return {"version": self.version, "workers": self.workers, "config": self.config_text,
                "config_sha256": self.config_sha256, "command": " ".join(self.command),
                "env": {"LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                        "LITELLM_TELEMETRY": "False"}}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_proxy(state_dir: Path, models: dict[str, tuple[str, str]], *, workers: int = 1,
                timeout: float = 180.0) -> LiteLLMProxy:
    """Starts ``litellm --config ... --port P`` and waits until a model call answers."""
    version = ensure_venv()
    cfg = state_dir / "litellm.yaml"
    text = write_config(cfg, models)
    port = _free_port()
    cmd = [str(VENV / "bin" / "litellm"), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
           "--num_workers", str(workers), "--telemetry", "False"]
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "LITELLM_TELEMETRY": "False", "DISABLE_ADMIN_UI": "True", "NO_DOCS": "True",
           "PYTHONUNBUFFERED": "1"}
    for var in ("DATABASE_URL", "REDIS_URL", "LITELLM_MASTER_KEY", "VIRTUAL_ENV", "PYTHONPATH"):
        env.pop(var, None)
    log = open(state_dir / "litellm.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(state_dir))
    name = next(iter(models))
    body = ('{"model": "%s", "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 8}' % name).encode()
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"litellm exited with {proc.returncode}: see {state_dir / 'litellm.log'}")
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=5) as resp:
                if resp.status == 200:
                    return LiteLLMProxy(proc, port, version, text, hashlib.sha256(text.encode()).hexdigest(),
                                        workers, cmd)
        except Exception as err:
            last = str(err)
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"litellm did not answer within {timeout}s ({last})")
