"""Wires the ledger service: servicers, authorisation table, runtime."""

from __future__ import annotations

import grpc

from igw.ledger.v1 import ledger_pb2_grpc
from services.ledger.authz import POLICY
from services.ledger.config import Settings
from services.common.server import ServiceRuntime

SERVICE_NAMES = ("igw.ledger.v1.LedgerService", "igw.ledger.v1.LedgerAdminService")


def _register(server: grpc.aio.Server) -> None:
    # Skeleton: every method answers UNIMPLEMENTED until the ledger issue fills it in.
    ledger_pb2_grpc.add_LedgerServiceServicer_to_server(ledger_pb2_grpc.LedgerServiceServicer(), server)
    ledger_pb2_grpc.add_LedgerAdminServiceServicer_to_server(ledger_pb2_grpc.LedgerAdminServiceServicer(), server)


async def build(settings: Settings) -> ServiceRuntime:
    """Builds the ledger's runtime (not yet started)."""
    return ServiceRuntime(
        settings.runtime, policy=POLICY, registrars=[_register], service_names=SERVICE_NAMES
    )
