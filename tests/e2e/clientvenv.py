"""A fresh virtualenv holding only `pip install ./clients`: what an agent installs.

``build_client_venv(tmp_path)`` returns the venv's python; ``run_client_script(python, env)``
runs :data:`CLIENT_SCRIPT` in it. The script only imports and checks offline behaviour unless
``IGW_ROUTER_ADDRS`` (and ``IGW_TLS_CERT``/``IGW_TLS_KEY``/``IGW_TLS_CA``) are set; then it also
calls the gateway (unary, stream, list models, budget) and prints one JSON line of results.
With ``IGW_SMOKE_EXPECT_BUDGET_EXCEEDED=1`` it expects the call to be refused for budget and
reports the typed error's fields instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

#: Distributions a client venv may hold: the client, its two runtime deps, and venv tooling.
ALLOWED_DISTRIBUTIONS = {"igw-client", "grpcio", "protobuf", "pip", "setuptools", "wheel", "typing-extensions"}
FORBIDDEN_DISTRIBUTIONS = {"googleapis-common-protos", "cryptography", "grpcio-status", "grpcio-tools"}

CLIENT_SCRIPT = r"""
import json, os, sys

import igw.client as c
from igw.client import BudgetExceeded, IgwClient, IgwError
from igw.rpc.v1 import status_pb2

forbidden = [m for m in ("google.rpc", "cryptography", "grpc_status") if m in sys.modules]
result = {"imported": hasattr(c, "IgwClient"), "forbidden_modules": forbidden}

# Offline: decode a hand-built grpc-status-details-bin trailer into a typed error.
info = status_pb2.ErrorInfo(reason="BUDGET_EXCEEDED", domain="ledger.igw", metadata={"remaining_nanos": "42"})
status = status_pb2.Status(code=8, message="budget", details=[
    status_pb2.AnyDetail(type_url="type.googleapis.com/google.rpc.ErrorInfo", value=info.SerializeToString())])

import grpc
class Rpc(grpc.RpcError):
    def code(self): return grpc.StatusCode.RESOURCE_EXHAUSTED
    def details(self): return "budget"
    def trailing_metadata(self): return (("grpc-status-details-bin", status.SerializeToString()),)
err = c.error_from_rpc_error(Rpc())
result["offline_error"] = {"type": type(err).__name__, "remaining_nanos": err.remaining_nanos}

if os.environ.get("IGW_ROUTER_ADDRS"):
    model = os.environ.get("IGW_SMOKE_MODEL", "fast")
    with IgwClient.from_env() as client:
        try:
            answer = client.generate(model, "hello from a fresh venv", max_output_tokens=32)
            result["generate"] = {"text": answer.text, "cost_nanos": answer.cost_nanos,
                                  "request_id": answer.request_id,
                                  "served_by": answer.served_by.deployment}
            kinds, text = [], ""
            for event in client.stream(model, "stream from a fresh venv", max_output_tokens=32):
                kinds.append(event.WhichOneof("event"))
                if event.HasField("text_delta"):
                    text += event.text_delta.text
            result["stream"] = {"kinds": kinds, "text": text}
            result["models"] = [m.alias for m in client.list_models().models]
            result["budgets"] = [b.remaining_nanos for b in client.get_budget().budgets]
        except BudgetExceeded as exc:
            result["budget_exceeded"] = {"code": exc.code_name, "reason": exc.reason, "domain": exc.domain,
                                         "remaining_nanos": exc.remaining_nanos, "limit_nanos": exc.limit_nanos}
        except IgwError as exc:
            result["error"] = {"type": type(exc).__name__, "code": exc.code_name, "reason": exc.reason,
                               "message": exc.message}
print(json.dumps(result))
"""


def build_client_venv(tmp_path: Path) -> Path:
    """Creates ``tmp_path/client-venv`` with ``pip install ./clients``; returns its python."""
    venv = tmp_path / "client-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(REPO / "clients")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"pip install ./clients failed:\n{proc.stdout}\n{proc.stderr}")
    return python


def installed_distributions(python: Path) -> set[str]:
    """Lower-cased names of everything installed in the venv of ``python``."""
    out = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return {item["name"].lower().replace("_", "-") for item in json.loads(out)}


def client_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without igw settings or the repo on the path, plus ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IGW_") and k != "PYTHONPATH"}
    clean.update(env or {})
    return clean


def run_client_script(python: Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Runs :data:`CLIENT_SCRIPT` in the venv (from a neutral directory) and returns its JSON."""
    clean = client_env(env)
    proc = subprocess.run(
        [str(python), "-c", CLIENT_SCRIPT],
        env=clean,
        cwd=python.parent,  # not the repo: `import igw` must come from the venv
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"client script failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result
