"""Wires the keyvault service: database, master-key check, audit writer, servicers, runtime.

Start-up order: migrate the vault's own database, check the master key against the stored
check value, unwrap (or on the first start make) the audit chain key, start the audit
writer, then serve. A missing, malformed or wrong master key
does not stop the process: it serves *sealed* — health NOT_SERVING, one clear error line
in the log (never key bytes), and every RPC but health answers UNAVAILABLE
``MASTER_KEY_UNAVAILABLE`` — so an orchestrator sees exactly what is wrong.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable

import grpc
from prometheus_client import CollectorRegistry

from igw.keyvault.v1 import keyvault_pb2_grpc
from services.common.db import make_async_engine, upgrade
from services.common.dbprobe import DatabaseProbe
from services.common.server import ServiceRuntime
from services.keyvault import domain as D
from services.keyvault.audit import AuditWriter
from services.keyvault.audit_reader import chain_head
from services.keyvault.authz import POLICY
from services.keyvault.config import Settings
from services.keyvault.keywatch import KeyWatch
from services.keyvault.metrics import VaultMetrics
from services.keyvault.repository import ChainKeyError, check_master_key, load_chain_key
from services.keyvault.service import VaultService
from services.keyvault.servicer import KeyVaultAdminServicer, KeyVaultServicer

_LOGGER = logging.getLogger(__name__)

SERVICE_NAMES = ("igw.keyvault.v1.KeyVaultService", "igw.keyvault.v1.KeyVaultAdminService")


async def build(
    settings: Settings,
    *,
    clock: Callable[[], dt.datetime] = D.utcnow,
) -> ServiceRuntime:
    """Builds the keyvault's runtime (not yet started); ``runtime.vault`` is the VaultService."""
    if settings.migrate:
        await asyncio.to_thread(upgrade, "keyvault", settings.database_url)
    engine = make_async_engine(settings.database_url, pool_size=10, max_overflow=20)
    master = settings.master_key
    chain_key: bytes | None = None
    if master is None:
        _LOGGER.error(
            "vault sealed: %s; every RPC answers UNAVAILABLE MASTER_KEY_UNAVAILABLE until restarted with it",
            settings.master_key_problem,
        )
    else:
        problem = await check_master_key(engine, master, clock)
        if problem is not None:
            _LOGGER.error(
                "vault sealed: %s; every RPC answers UNAVAILABLE MASTER_KEY_UNAVAILABLE until restarted with "
                "the right key",
                problem,
            )
            master = None
        else:
            try:
                chain_key = await load_chain_key(engine, master, clock)
            except ChainKeyError as err:
                _LOGGER.error(
                    "vault sealed: %s; every RPC answers UNAVAILABLE MASTER_KEY_UNAVAILABLE until the audit "
                    "chain key is restored",
                    err,
                )
                master = None
            else:
                _LOGGER.info("vault unsealed", extra={"master_key_id": master.key_id})

    registry = CollectorRegistry()
    metrics = VaultMetrics(registry)
    if chain_key is not None:
        # From the start, so a restart does not look like a truncated log to whoever watches it.
        metrics.head_sequence.set(await chain_head(engine))
    writer = AuditWriter(
        engine, metrics, clock, chain_key=chain_key, lock_timeout_ms=settings.audit_lock_timeout_ms
    )
    writer.start()
    service = VaultService(
        engine,
        writer,
        metrics,
        master,
        clock=clock,
        lease_ttl=dt.timedelta(seconds=settings.lease_ttl_seconds),
        lease_max_ttl=dt.timedelta(seconds=settings.lease_max_ttl_seconds),
        default_grace=dt.timedelta(seconds=settings.grace_seconds),
        key_cache_seconds=settings.key_cache_seconds,
    )
    # Key changes made through any replica drop this replica's cached keys at once.
    watch = KeyWatch(engine.url.set(drivername="postgresql").render_as_string(hide_password=False),
                     service.invalidate_cache)
    watch.start()

    def register(server: grpc.aio.Server) -> None:
        keyvault_pb2_grpc.add_KeyVaultServiceServicer_to_server(KeyVaultServicer(service), server)
        keyvault_pb2_grpc.add_KeyVaultAdminServiceServicer_to_server(KeyVaultAdminServicer(service), server)

    probe = DatabaseProbe(settings.database_url)
    runtime = ServiceRuntime(
        settings.runtime,
        policy=POLICY,
        registrars=[register],
        service_names=SERVICE_NAMES,
        registry=registry,
        # closed in reverse: probe, watch, writer, engine
        closers=[engine.dispose, writer.close, watch.close, probe.close],
        access_log=False,
        initially_serving=not service.sealed,
        on_denied=service.record_refusal,  # refused calls are audited too
        readiness=probe,
    )
    runtime.vault = service  # type: ignore[attr-defined]
    return runtime
