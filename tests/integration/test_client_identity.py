"""How the agents' client checks the router's identity: gRPC's own TLS when the router's
certificate states its identity as a DNS name, else the SPIFFE tunnel (igw.client._identity).

Real in-process gRPC servers (a RouterService that answers ListModels) over real mTLS, with
certificates minted per test; the sync and the asyncio client both.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from igw.client import AsyncIgwClient, IgwClient, IgwError
from igw.client._identity import identity_dns_name, probe
from igw.client._spiffe import TlsFiles
from igw.router.v1 import router_pb2, router_pb2_grpc
from igw_dev.pki import issue_cert
from services.common.tls import server_credentials
from tests.integration.identity_certs import new_ca

ROUTER = "spiffe://igw.local/router"
LEDGER = "spiffe://igw.local/ledger"


@pytest.fixture
def tls(tmp_path: Path) -> Path:
    mint = new_ca(tmp_path)

    mint("agent", "spiffe://igw.local/team/t1/agent/a1", dns_names=())
    mint("router", ROUTER, dns_names=())  # URI SAN and the identity's DNS name (as igw pki issues)
    mint("router-uri-only", ROUTER, dns_names=(), identity_name=False)  # cert-manager with uris only
    # The ledger's identity with the router's DNS name added: a certificate that lies about one of them.
    mint("ledger-named-router", LEDGER, dns_names=(identity_dns_name(ROUTER),))
    return tmp_path


class Models(router_pb2_grpc.RouterServiceServicer):
    """Answers one model, described by the SPIFFE id of the client certificate the call came with."""

    async def ListModels(self, request, context):  # type: ignore[no-untyped-def]
        pem = context.auth_context()["x509_pem_cert"][0]
        uri = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)[0]
        return router_pb2.ListModelsResponse(models=[router_pb2.ModelInfo(alias="fast", description=uri)])


class Router:
    """A RouterService on the mTLS port presenting ``stem``'s certificate (``port`` to restart on one)."""

    def __init__(self, d: Path, stem: str, port: int = 0) -> None:
        self.server = grpc.aio.server()
        router_pb2_grpc.add_RouterServiceServicer_to_server(Models(), self.server)
        creds = server_credentials(d / f"{stem}.pem", d / f"{stem}-key.pem", d / "ca.pem")
        self.port = self.server.add_secure_port(f"127.0.0.1:{port}", creds)
        self.address = f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> Router:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(0)


def _kw(d: Path, address: str, **extra: object) -> dict[str, object]:
    return {"addresses": [address], "cert": d / "agent.pem", "key": d / "agent-key.pem", "ca": d / "ca.pem",
            "timeout": 5, "max_attempts": 3, **extra}


async def _models_async(client: AsyncIgwClient) -> list[str]:
    return [m.alias for m in (await client.list_models()).models]


def _models_sync(client: IgwClient) -> list[str]:
    return [m.alias for m in client.list_models().models]


@pytest.mark.parametrize(("stem", "check", "mode"), [
    ("router", "auto", "native"),
    ("router-uri-only", "auto", "tunnel"),
    ("router", "uri", "tunnel"),
])
async def test_both_clients_use_grpcs_tls_only_for_a_router_that_states_its_identity_name(
    tls: Path, stem: str, check: str, mode: str,
) -> None:
    async with Router(tls, stem) as router:
        async with AsyncIgwClient(**_kw(tls, router.address, identity_check=check)) as client:
            assert await _models_async(client) == ["fast"]
            assert client._links[0].mode == mode
            assert (client._tunnels == []) is (mode == "native")

        def sync() -> str:
            with IgwClient(**_kw(tls, router.address, identity_check=check)) as client:
                assert _models_sync(client) == ["fast"]
                return client._links[0].mode

        assert await asyncio.to_thread(sync) == mode


async def test_a_certificate_that_names_the_router_under_another_identity_is_refused(tls: Path) -> None:
    async with Router(tls, "ledger-named-router") as impostor:
        assert (await asyncio.to_thread(probe, impostor.address, ROUTER, TlsFiles(
            tls / "agent.pem", tls / "agent-key.pem", tls / "ca.pem"))).verdict == "refused"
        async with AsyncIgwClient(**_kw(tls, impostor.address)) as client:
            with pytest.raises(IgwError) as exc:
                await client.list_models()
            assert exc.value.code == grpc.StatusCode.UNAVAILABLE
            assert client._links[0].mode == "tunnel" and client._tunnels[0].refusals >= 1


async def test_a_rotated_client_certificate_gets_a_new_native_channel(tls: Path) -> None:
    async with Router(tls, "router") as router:
        async with AsyncIgwClient(**_kw(tls, router.address)) as client:
            assert (await client.list_models()).models[0].description == "spiffe://igw.local/team/t1/agent/a1"
            first = client._links[0]
            # A new agent certificate lands: a second later, the next call goes on a channel built
            # from it (gRPC's own TLS reads the files once per channel); the old one is retired.
            cert, key = issue_cert((tls / "ca.pem").read_bytes(), (tls / "ca-key.pem").read_bytes(),
                                   "spiffe://igw.local/team/t1/agent/a2", dns_names=(), ip_addresses=())
            (tls / "agent-key.pem").write_bytes(key)
            (tls / "agent.pem").write_bytes(cert)
            await asyncio.sleep(1.1)
            assert (await client.list_models()).models[0].description == "spiffe://igw.local/team/t1/agent/a2"
            assert client._links[0] is not first and client._links[0].mode == "native"
            assert first.channel in client._old


async def test_a_router_rotated_to_a_uri_only_certificate_is_reached_through_the_tunnel(tls: Path) -> None:
    router = Router(tls, "router")
    port = router.port
    async with router:
        client = AsyncIgwClient(**_kw(tls, router.address, max_attempts=4))
        assert await _models_async(client) == ["fast"]
        assert client._links[0].mode == "native"
    # The same address now presents a certificate without the name: the native channel's
    # handshake fails, the client probes again and goes through the tunnel.
    async with Router(tls, "router-uri-only", port):
        try:
            loop = asyncio.get_running_loop()
            end = loop.time() + 10
            while True:
                try:
                    assert await _models_async(client) == ["fast"]
                    break
                except IgwError:
                    assert loop.time() < end, "the client never reached the rotated router"
                    await asyncio.sleep(0.2)
            assert client._links[0].mode == "tunnel"
        finally:
            await client.close()
