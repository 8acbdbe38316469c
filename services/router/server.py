"""Wires the router: routing config (followed on disk), every ledger and vault replica, HTTP pool, servicers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import grpc
from prometheus_client import CollectorRegistry

from igw.client._spiffe import TlsFiles
from igw.keyvault.v1 import keyvault_pb2_grpc
from igw.ledger.v1 import ledger_pb2_grpc
from igw.router.v1 import router_pb2_grpc
from services.common.server import ServiceRuntime
from services.common.tracing import client_interceptors, setup_tracing
from services.router.authz import POLICY
from services.router.config import ConfigSource, Settings
from services.router.edge.server import EdgeLimits, EdgeServer
from services.router.edge.tls import ServerTLS
from services.router.metrics import RouterMetrics
from services.router.pool import ReplicaPool
from services.router.providers.base import make_http_client
from services.router.routing import ConfigError
from services.router.service import Backends, Router
from services.router.servicer import ConfigHolder, RouterAdminServicer, RouterServicer

_LOGGER = logging.getLogger(__name__)
SERVICE_NAMES = ("igw.router.v1.RouterService", "igw.router.v1.RouterAdminService")
LEDGER_HEALTH_NAME = "igw.ledger.v1.LedgerService"
KEYVAULT_HEALTH_NAME = "igw.keyvault.v1.KeyVaultService"


class ConfigRefused(SystemExit):
    """The routing config does not validate or does not match its pinned digest."""


async def watch_config(holder: ConfigHolder, source: ConfigSource, interval_s: float) -> None:
    """Reloads the routing config whenever its file or its pin file changes on disk.

    This is how a Kubernetes ConfigMap update arrives (the kubelet swaps a symlink). A file
    that does not validate or match its pin is rejected by ``holder.reload``: the last good
    config stays active and the rejection is logged and counted.
    """
    seen = source.stamps()
    while True:
        await asyncio.sleep(interval_s)
        now = source.stamps()
        if now == seen:
            continue
        seen = now
        with contextlib.suppress(Exception):  # a rejected reload is logged and counted by reload()
            await holder.reload()


async def build(settings: Settings) -> ServiceRuntime:
    """Builds the router's runtime (not yet started). Refuses to start on a bad or unpinned config."""
    source = ConfigSource(settings.config_path, settings.config_sha256, settings.config_sha256_file)
    try:
        config = source.load()
    except ConfigError as err:
        _LOGGER.error("routing config refused; not starting", extra={"error": str(err)})
        raise ConfigRefused(3) from None
    _LOGGER.info("routing config loaded", extra={"sha256": config.sha256, "source": config.source})
    rt = settings.runtime
    tracer = setup_tracing("router", rt.otlp_endpoint, rt.trace_file)
    hooks = client_interceptors(tracer)
    files = TlsFiles(rt.tls_cert, rt.tls_key, rt.tls_ca)
    ledgers = ReplicaPool("ledger", settings.ledger_addr.split(","), settings.ledger_id, files,
                          LEDGER_HEALTH_NAME, interceptors=hooks, identity_check=settings.upstream_identity)
    vaults = ReplicaPool("keyvault", settings.keyvault_addr.split(","), settings.keyvault_id, files,
                         KEYVAULT_HEALTH_NAME, interceptors=hooks, identity_check=settings.upstream_identity)
    await ledgers.start()
    await vaults.start()
    backends = Backends(
        ledger=ledgers.stub(ledger_pb2_grpc.LedgerServiceStub),
        ledger_admin=ledgers.stub(ledger_pb2_grpc.LedgerAdminServiceStub),
        vault=vaults.stub(keyvault_pb2_grpc.KeyVaultServiceStub),
    )
    http = make_http_client(max_connections=settings.max_connections,
                            connect_timeout_s=config.timeouts.connect_ms / 1000)
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    router = Router(config, backends, http, metrics, lease_ttl_s=settings.lease_ttl_seconds)
    holder = ConfigHolder(router, source.load, lambda: source.current_pin)
    for pool in (ledgers, vaults):
        metrics.replicas.labels(pool.service).set_function(pool.healthy_count)
    watcher = asyncio.get_running_loop().create_task(
        watch_config(holder, source, settings.config_watch_seconds))

    def register(server: grpc.aio.Server) -> None:
        router_pb2_grpc.add_RouterServiceServicer_to_server(RouterServicer(router), server)
        router_pb2_grpc.add_RouterAdminServiceServicer_to_server(RouterAdminServicer(holder), server)

    async def close() -> None:
        watcher.cancel()
        await router.drain(runtime.time_left())
        await http.aclose()
        await ledgers.close()
        await vaults.close()

    async def ready() -> bool:
        # Ready while at least one ledger and one vault replica answer SERVING.
        return ledgers.ready() and vaults.ready()

    edge = _edge(settings, router, registry)
    runtime = ServiceRuntime(
        rt, policy=POLICY, registrars=[register], service_names=SERVICE_NAMES, registry=registry,
        closers=[close], access_log=settings.access_log, readiness=ready, listeners=[edge] if edge else [],
    )
    if edge is not None:
        edge.tracer = runtime.tracer

    def on_sighup() -> None:
        async def _reload() -> None:
            with contextlib.suppress(Exception):  # a rejected reload is logged by reload()
                await holder.reload()

        asyncio.get_running_loop().create_task(_reload())

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
    return runtime


def _edge(settings: Settings, router: Router, registry: CollectorRegistry) -> EdgeServer | None:
    """The OpenAI/Anthropic-compatible HTTPS listener, when IGW_ROUTER_HTTP_LISTEN is set."""
    if not settings.http_listen:
        return None
    rt = settings.runtime
    limits = EdgeLimits(
        handshake_timeout_s=settings.http_handshake_timeout_s, idle_timeout_s=settings.http_idle_timeout_s,
        body_timeout_s=settings.http_body_timeout_s, write_timeout_s=settings.http_write_timeout_s,
        max_connections=settings.http_max_connections, max_body_bytes=settings.http_max_body_bytes,
    )
    tls = ServerTLS(rt.tls_cert, rt.tls_key, rt.tls_ca)
    return EdgeServer(router, settings.http_listen, tls.context, registry, trust_domain=rt.trust_domain, limits=limits)
