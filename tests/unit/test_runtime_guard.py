"""The shared runtime's guard on a real mTLS server: a handler's unexpected exception is a
generic INTERNAL (its text never reaches the caller), and the trust domain is enforced."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from services.common import pki
from services.common.authz import ALL_KINDS, make_policy
from services.common.errors import error_info_from_rpc_error
from services.common.server import ServiceRuntime
from services.common.settings import RuntimeSettings
from services.common.tls import secure_channel

SECRET = "sk-should-never-leave-the-process"


async def _boom(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise RuntimeError(f"database said {SECRET}")


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


def _register(server: grpc.aio.Server) -> None:
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("igw.test.v1.Test", {
        "Boom": grpc.unary_unary_rpc_method_handler(_boom),
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
    })])


@asynccontextmanager
async def _runtime(paths: pki.PkiPaths, trust_domain: str) -> AsyncIterator[ServiceRuntime]:
    settings = RuntimeSettings.from_env("ledger", {
        "IGW_TLS_CERT": str(paths.ledger.cert), "IGW_TLS_KEY": str(paths.ledger.key),
        "IGW_TLS_CA": str(paths.ca_cert), "IGW_TRUST_DOMAIN": trust_domain, "IGW_GRACE_SECONDS": "1",
    })
    rt = ServiceRuntime(settings, policy=make_policy({"/igw.test.v1.Test/*": ALL_KINDS}),
                        registrars=[_register], service_names=["igw.test.v1.Test"])
    await rt.start()
    try:
        yield rt
    finally:
        await rt.stop()


async def _call(rt: ServiceRuntime, paths: pki.PkiPaths, method: str) -> bytes:
    agent = paths.agent_demo
    async with secure_channel(f"127.0.0.1:{rt.port}", agent.cert, agent.key, paths.ca_cert) as channel:
        result: bytes = await channel.unary_unary(f"/igw.test.v1.Test/{method}")(b"hello", timeout=5)
        return result


async def test_an_unexpected_exception_is_a_generic_internal_error(tmp_path: Path) -> None:
    paths = pki.init_dev_pki(tmp_path / "pki")
    async with _runtime(paths, "igw.local") as rt:
        assert await _call(rt, paths, "Echo") == b"hello"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _call(rt, paths, "Boom")
    err = info.value
    assert err.code() == grpc.StatusCode.INTERNAL
    assert SECRET not in (err.details() or "") and "database said" not in (err.details() or "")
    assert SECRET not in repr(err.trailing_metadata())


async def test_a_caller_from_another_trust_domain_is_refused(tmp_path: Path) -> None:
    paths = pki.init_dev_pki(tmp_path / "pki")  # certificates of igw.local
    async with _runtime(paths, "example.org") as rt:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _call(rt, paths, "Echo")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    reason = error_info_from_rpc_error(info.value)
    assert reason is not None and reason.reason
