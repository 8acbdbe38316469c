"""Wires the keyvault service: servicers, authorisation table, runtime."""

from __future__ import annotations

import grpc

from igw.keyvault.v1 import keyvault_pb2_grpc
from services.keyvault.authz import POLICY
from services.keyvault.config import Settings
from services.common.server import ServiceRuntime

SERVICE_NAMES = ("igw.keyvault.v1.KeyVaultService", "igw.keyvault.v1.KeyVaultAdminService")


def _register(server: grpc.aio.Server) -> None:
    # Skeleton: every method answers UNIMPLEMENTED until the keyvault issue fills it in.
    keyvault_pb2_grpc.add_KeyVaultServiceServicer_to_server(keyvault_pb2_grpc.KeyVaultServiceServicer(), server)
    keyvault_pb2_grpc.add_KeyVaultAdminServiceServicer_to_server(keyvault_pb2_grpc.KeyVaultAdminServiceServicer(), server)


async def build(settings: Settings) -> ServiceRuntime:
    """Builds the keyvault's runtime (not yet started)."""
    return ServiceRuntime(
        settings.runtime, policy=POLICY, registrars=[_register], service_names=SERVICE_NAMES
    )
