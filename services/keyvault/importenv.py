"""`igw keys import-env`: store the provider keys found in the environment, over gRPC.

``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY`` and ``GEMINI_API_KEY`` (whichever are set) become
keys ``openai-env``, ``anthropic-env`` and ``gemini-env`` of providers ``openai``,
``anthropic`` and ``gemini``, bound to each provider's public base URL, usable by every team.
A name that exists already is left alone (rotate it with RotateProviderKey instead), so
running the import twice is harmless. Secrets travel only inside the CreateProviderKey
request to the vault; they are never printed or logged here.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from igw.keyvault.v1 import keyvault_pb2 as pb


@dataclass(frozen=True, slots=True)
class EnvKey:
    """One environment variable the import knows about."""

    variable: str
    name: str
    provider: str
    base_url: str


ENV_KEYS: tuple[EnvKey, ...] = (
    EnvKey("OPENAI_API_KEY", "openai-env", "openai", "https://api.openai.com/v1"),
    EnvKey("ANTHROPIC_API_KEY", "anthropic-env", "anthropic", "https://api.anthropic.com"),
    EnvKey("GEMINI_API_KEY", "gemini-env", "gemini", "https://generativelanguage.googleapis.com"),
)


def requests_from_env(env: Mapping[str, str]) -> list[pb.CreateProviderKeyRequest]:
    """The CreateProviderKey requests for the variables that are set (non-blank)."""
    out = []
    for spec in ENV_KEYS:
        secret = env.get(spec.variable, "").strip()
        if not secret:
            continue
        out.append(
            pb.CreateProviderKeyRequest(
                request_id=f"import-env-{uuid.uuid4().hex}",
                name=spec.name,
                provider=spec.provider,
                secret=secret,
                base_url=spec.base_url,
                all_teams=True,
                labels={"source": "import-env"},
            )
        )
    return out


def _exists(err: grpc.RpcError) -> bool:
    code = getattr(err, "code", None)
    return callable(code) and code() == grpc.StatusCode.ALREADY_EXISTS


def import_env(stub: Any, env: Mapping[str, str], *, timeout: float = 10.0) -> list[str]:
    """With a synchronous ``KeyVaultAdminServiceStub``: stores the keys; returns the names created."""
    created = []
    for req in requests_from_env(env):
        try:
            stub.CreateProviderKey(req, timeout=timeout)
        except grpc.RpcError as err:
            if _exists(err):
                continue
            raise
        created.append(req.name)
    return created


async def import_env_async(stub: Any, env: Mapping[str, str], *, timeout: float = 10.0) -> list[str]:
    """The same with a ``grpc.aio`` stub."""
    created = []
    for req in requests_from_env(env):
        try:
            await stub.CreateProviderKey(req, timeout=timeout)
        except grpc.RpcError as err:
            if _exists(err):
                continue
            raise
        created.append(req.name)
    return created
