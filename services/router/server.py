"""Wires the router service: servicers, authorisation table, runtime."""

from __future__ import annotations

import grpc

from igw.router.v1 import router_pb2_grpc
from services.router.authz import POLICY
from services.router.config import Settings
from services.common.server import ServiceRuntime

SERVICE_NAMES = ("igw.router.v1.RouterService", "igw.router.v1.RouterAdminService")


def _register(server: grpc.aio.Server) -> None:
    # Skeleton: every method answers UNIMPLEMENTED until the router issue fills it in.
    router_pb2_grpc.add_RouterServiceServicer_to_server(router_pb2_grpc.RouterServiceServicer(), server)
    router_pb2_grpc.add_RouterAdminServiceServicer_to_server(router_pb2_grpc.RouterAdminServiceServicer(), server)


async def build(settings: Settings) -> ServiceRuntime:
    """Builds the router's runtime (not yet started)."""
    return ServiceRuntime(
        settings.runtime, policy=POLICY, registrars=[_register], service_names=SERVICE_NAMES
    )
