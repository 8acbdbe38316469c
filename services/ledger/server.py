"""Wires the ledger service: migrations, pool, servicers, sweeper, authorisation, runtime."""

from __future__ import annotations

import asyncio
import logging

import grpc
from prometheus_client import CollectorRegistry

from igw.ledger.v1 import ledger_pb2_grpc
from services.common import db
from services.common.dbprobe import DatabaseProbe
from services.common.server import Registrar, ServiceRuntime
from services.ledger.authz import POLICY
from services.ledger.config import LedgerSettings, Settings
from services.ledger.repository import Repository
from services.ledger.service import Clock, LedgerMetrics, LedgerService, utcnow
from services.ledger.servicer import LedgerAdminServicer, LedgerServicer
from services.ledger.sweeper import Sweeper

_LOGGER = logging.getLogger(__name__)

SERVICE_NAMES = ("igw.ledger.v1.LedgerService", "igw.ledger.v1.LedgerAdminService")


async def open_service(
    settings: LedgerSettings, registry: CollectorRegistry, *, now: Clock = utcnow
) -> LedgerService:
    """Migrates (if enabled, under the migration advisory lock), opens the pool, seeds prices."""
    if settings.migrate:
        await asyncio.to_thread(db.upgrade, "ledger", settings.database_url)
        _LOGGER.info("ledger schema at head")
    repo = await Repository.open(
        settings.database_url, pool_size=settings.pool_size, timeout=settings.db_timeout_seconds,
        allow_unbudgeted=settings.allow_unbudgeted,
    )
    if settings.allow_unbudgeted:
        _LOGGER.warning("IGW_LEDGER_ALLOW_UNBUDGETED is on: teams without a budget spend without limit")
    service = LedgerService(
        repo, LedgerMetrics(registry), now=now, hold_ttl_seconds=settings.hold_ttl_seconds,
        partitions_ahead_months=settings.partitions_ahead_months, retention_days=settings.retention_days,
    )
    try:
        await service.seed_default_prices()
        await service.maintain()
    except BaseException:
        await repo.close()
        raise
    return service


def registrar(service: LedgerService) -> Registrar:
    """A runtime registrar adding both ledger servicers."""

    def register(server: grpc.aio.Server) -> None:
        ledger_pb2_grpc.add_LedgerServiceServicer_to_server(LedgerServicer(service), server)
        ledger_pb2_grpc.add_LedgerAdminServiceServicer_to_server(LedgerAdminServicer(service), server)

    return register


async def build(settings: Settings) -> ServiceRuntime:
    """Builds the ledger's runtime (not yet started); the sweeper runs while it serves."""
    registry = CollectorRegistry()
    service = await open_service(settings.ledger, registry)
    sweeper = Sweeper(service, settings.ledger.sweep_interval_seconds, settings.ledger.maintenance_interval_seconds)
    probe = DatabaseProbe(settings.ledger.database_url)

    async def close() -> None:
        await sweeper.stop()
        await probe.close()
        await service.repo.close()

    runtime = ServiceRuntime(
        settings.runtime,
        policy=POLICY,
        registrars=[registrar(service)],
        service_names=SERVICE_NAMES,
        registry=registry,
        closers=[close],
        access_log=False,
        readiness=probe,
    )
    sweeper.start()
    return runtime
