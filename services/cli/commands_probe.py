"""`igw probe HOST:PORT [SERVICE]`: a gRPC health check with grpc_health_probe's exit codes.

0  SERVING
1  invalid arguments
2  connection failure (nothing answered within the connect timeout)
3  RPC failure (the Check call failed, e.g. UNIMPLEMENTED, NOT_FOUND, a deadline)
4  unhealthy (the service answered with a status other than SERVING)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import grpc

from services.cli.parsing import IgwArgumentParser, SubParsers

__all__ = [
    "EXIT_CONNECTION_FAILURE",
    "EXIT_INVALID_ARGUMENTS",
    "EXIT_RPC_FAILURE",
    "EXIT_SUCCESS",
    "EXIT_UNHEALTHY",
    "probe",
    "register",
]

EXIT_SUCCESS = 0
EXIT_INVALID_ARGUMENTS = 1
EXIT_CONNECTION_FAILURE = 2
EXIT_RPC_FAILURE = 3
EXIT_UNHEALTHY = 4

_ADDRESS_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})\Z")


def register(sub: SubParsers, parent: argparse.ArgumentParser) -> None:
    """Adds `probe` (its usage errors exit 1, like grpc_health_probe)."""
    p = sub.add_parser(
        "probe",
        help="gRPC health check (grpc_health_probe exit codes)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        error_exit_code=EXIT_INVALID_ARGUMENTS,
    )
    assert isinstance(p, IgwArgumentParser)
    p.add_argument("addr", metavar="HOST:PORT", help="the probe port (plaintext) or, with --tls, the mTLS port")
    p.add_argument("service", nargs="?", default="", help="service name to check ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=1.0, help="RPC timeout in seconds (default 1)")
    p.add_argument("--connect-timeout", type=float, default=1.0, help="connect timeout in seconds (default 1)")
    p.add_argument("--tls", action="store_true", help="use (m)TLS instead of plaintext")
    p.add_argument("--cert", help="client certificate (with --tls)")
    p.add_argument("--key", help="client key (with --tls)")
    p.add_argument("--ca", help="CA to trust (with --tls)")
    p.add_argument("--server-name", default=None, help="with --tls: check this DNS name instead of the address")
    p.add_argument("--server-id", default=None, metavar="SPIFFE_ID",
                   help="with --tls and --cert/--key/--ca: the SPIFFE id the server must present (its URI SAN)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_probe, error_exit_code=EXIT_INVALID_ARGUMENTS)


def _fail(code: int, message: str) -> int:
    print(message, file=sys.stderr)
    return code


def cmd_probe(args: argparse.Namespace) -> int:
    """Runs the probe from parsed arguments."""
    if not _ADDRESS_RE.match(args.addr) or not 0 < int(args.addr.rsplit(":", 1)[1]) < 65536:
        return _fail(EXIT_INVALID_ARGUMENTS, f"error: invalid address {args.addr!r} (expected HOST:PORT)")
    if args.timeout <= 0 or args.connect_timeout <= 0:
        return _fail(EXIT_INVALID_ARGUMENTS, "error: --timeout and --connect-timeout must be positive")
    credentials = None
    if args.tls:
        try:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(args.ca).read_bytes() if args.ca else None,
                private_key=Path(args.key).read_bytes() if args.key else None,
                certificate_chain=Path(args.cert).read_bytes() if args.cert else None,
            )
        except OSError as err:
            return _fail(EXIT_INVALID_ARGUMENTS, f"error: cannot read TLS files: {err}")
    elif args.cert or args.key or args.ca or args.server_id:
        return _fail(EXIT_INVALID_ARGUMENTS, "error: --cert/--key/--ca/--server-id need --tls")
    if args.server_id:
        if not (args.cert and args.key and args.ca):
            return _fail(EXIT_INVALID_ARGUMENTS, "error: --server-id needs --cert, --key and --ca")
        from igw.client._spiffe import TlsFiles, TunnelThread

        tunnels = TunnelThread()
        try:
            tunnel = tunnels.open(args.addr, args.server_id, TlsFiles(Path(args.cert), Path(args.key), Path(args.ca)))
            code, message = probe(tunnel.target, args.service, timeout=args.timeout,
                                  connect_timeout=args.connect_timeout)
        finally:
            tunnels.close()
        if code != EXIT_SUCCESS:
            return _fail(code, message.replace(tunnel.target, args.addr))
        if not args.quiet:
            print(message)
        return code
    code, message = probe(
        args.addr,
        args.service,
        timeout=args.timeout,
        connect_timeout=args.connect_timeout,
        credentials=credentials,
        server_name=args.server_name,
    )
    if code != EXIT_SUCCESS:
        return _fail(code, message)
    if not args.quiet:
        print(message)
    return code


def probe(
    address: str,
    service: str = "",
    *,
    timeout: float = 1.0,
    connect_timeout: float = 1.0,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
) -> tuple[int, str]:
    """Checks ``service`` at ``address``; returns ``(exit_code, message)``."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    options = [("grpc.ssl_target_name_override", server_name)] if credentials is not None and server_name else []
    channel = (
        grpc.secure_channel(address, credentials, options)
        if credentials is not None
        else grpc.insecure_channel(address)
    )
    try:
        try:
            grpc.channel_ready_future(channel).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            return EXIT_CONNECTION_FAILURE, (
                f"timeout: failed to connect service {address!r} within {connect_timeout:g}s"
            )
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
            details = err.details() if hasattr(err, "details") else ""
            if code == grpc.StatusCode.UNAVAILABLE:
                return EXIT_CONNECTION_FAILURE, f"error: connection failure: {details}"
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return EXIT_RPC_FAILURE, f"timeout: health rpc did not complete within {timeout:g}s"
            return EXIT_RPC_FAILURE, f"error: health rpc failed: {name}: {details}"
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            return EXIT_UNHEALTHY, f"service unhealthy (responded with {status!r})"
        return EXIT_SUCCESS, f"status: {status}"
    finally:
        channel.close()
