"""The shared gRPC server runtime: mTLS port, probe port, guard interceptor, lifecycle.

``ServiceRuntime`` builds one grpc.aio server on the mTLS port (the service's own
servicers, ``grpc.health.v1``, reflection) and a second plaintext server on the probe
port that serves health and nothing else. Every call on the mTLS port passes the guard
first (``services.common.guard``: identity from the client certificate, the authorisation
table, a request id in the logging context, errors mapped once to status + ErrorInfo, and
RPC metrics); the metrics port serves ``services.common.server_metrics``.

Health service names (the same on the mTLS port and the plaintext probe port):

- ``liveness``: SERVING while the process is up and its event loop answers; NOT_SERVING
  only once shutting down. A Kubernetes liveness probe restarts a process that stops answering.
- ``readiness``: SERVING only while the service can reach what it depends on (the service's
  ``readiness`` check, run every second: a cheap database query for the ledger and the vault,
  a healthy ledger and vault replica for the router) and is not draining.
- ``""`` and each service's full name (e.g. ``igw.ledger.v1.LedgerService``) mirror readiness.

Lifecycle: SERVING once both ports are bound; on SIGTERM/SIGINT health turns
NOT_SERVING, in-flight calls drain within the grace period, then the service's own
closers run (engines, channels, HTTP clients) and the process exits 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from services.common.authz import Policy
from services.common.guard import DenialHook, GuardInterceptor
from services.common.server_metrics import RpcMetrics, add_standard_metrics, cert_not_after
from services.common.settings import RuntimeSettings
from services.common.tls import SERVER_OPTIONS, server_credentials
from services.common.tracing import setup_tracing, shutdown_tracing

_LOGGER = logging.getLogger(__name__)
# Extra seconds each closer gets past the grace period to release connections and files.
_CLOSE_FLOOR_S = 2.0


def parse_listen(addr: str) -> tuple[str, int]:
    """Splits ``host:port`` (port may be 0)."""
    host, _, port = addr.rpartition(":")
    return host or "127.0.0.1", int(port)


Registrar = Callable[[grpc.aio.Server], None]
Closer = Callable[[], Awaitable[None]]
#: True when the service can reach its dependencies (called every ``readiness_interval_s``).
ReadinessCheck = Callable[[], Awaitable[bool]]
LIVENESS = "liveness"
READINESS = "readiness"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING



class Listener(Protocol):
    """Another port a service serves next to gRPC (the router's HTTPS edge)."""

    async def start(self) -> dict[str, int]:
        """Binds and serves; returns the ports to add to the ready file (e.g. ``{"http_port": n}``)."""

    async def stop(self, timeout: float) -> None:
        """Stops accepting and drains within ``timeout``."""


class ServiceRuntime:
    """One service's servers and lifecycle. Construct, ``await start()``, ``await wait()``."""

    def __init__(
        self,
        settings: RuntimeSettings,
        *,
        policy: Policy,
        registrars: Iterable[Registrar],
        service_names: Iterable[str],
        registry: CollectorRegistry | None = None,
        closers: Iterable[Closer] = (),
        access_log: bool = True,
        initially_serving: bool = True,
        on_denied: DenialHook | None = None,
        listeners: Iterable[Listener] = (),
        readiness: ReadinessCheck | None = None,
        readiness_interval_s: float = 1.0,
    ) -> None:
        self.settings = settings
        self._listeners = list(listeners)
        self.extra_ports: dict[str, int] = {}
        self.domain = f"{settings.service}.igw"
        self.registry = registry or CollectorRegistry()
        self.metrics = RpcMetrics(self.registry)
        self._ready_gauge = add_standard_metrics(self.registry, settings.service)
        self._readiness = readiness
        self.readiness_interval_s = readiness_interval_s
        self._deps_ok = True
        self._readiness_task: asyncio.Task[None] | None = None
        self.health = HealthServicer()
        self._service_names = list(service_names)
        self._closers = list(closers)
        self._stop_deadline: float | None = None
        self._stopping = asyncio.Event()
        self.tracer = setup_tracing(settings.service, settings.otlp_endpoint, settings.trace_file)
        options = SERVER_OPTIONS
        if settings.reuse_port:  # one of several worker processes on one port (the kernel spreads connections)
            options = (*(o for o in SERVER_OPTIONS if o[0] != "grpc.so_reuseport"), ("grpc.so_reuseport", 1))
        self.guard = GuardInterceptor(
            policy, settings.trust_domain, self.domain, self.metrics, access_log, self.tracer, on_denied,
        )
        self.server = grpc.aio.server(
            interceptors=[self.guard],
            options=options,
            maximum_concurrent_rpcs=None,
        )
        for register in registrars:
            register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self._service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME],
            self.server,
        )
        self.probe_server = grpc.aio.server(options=options)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.probe_server)
        self.port = 0
        self.probe_port = 0
        self.metrics_port = 0
        self._metrics_httpd: Any = None
        self.serving = False
        self.initially_serving = initially_serving

    async def start(self, *, serving: bool | None = None) -> None:
        """Binds both ports and the metrics port; marks SERVING unless told otherwise."""
        serving = self.initially_serving if serving is None else serving
        s = self.settings
        host, port = parse_listen(s.listen)
        creds = server_credentials(s.tls_cert, s.tls_key, s.tls_ca)
        self.metrics.cert_expiry.labels(s.service).set_function(lambda: cert_not_after(s.tls_cert))
        self.port = self.server.add_secure_port(f"{host}:{port}", creds)
        phost, pport = parse_listen(s.probe_listen)
        self.probe_port = self.probe_server.add_insecure_port(f"{phost}:{pport}")
        await self.server.start()
        await self.probe_server.start()
        for listener in self._listeners:
            self.extra_ports.update(await listener.start())
        mhost, mport = parse_listen(s.metrics_listen)
        httpd, _thread = start_http_server(mport, addr=mhost, registry=self.registry)
        self._metrics_httpd = httpd
        self.metrics_port = httpd.server_address[1]
        await self.health.set(LIVENESS, _SERVING)
        if self._readiness is not None:
            self._deps_ok = await self._check_readiness()
            self._readiness_task = asyncio.get_running_loop().create_task(self._readiness_loop())
        await self.set_serving(serving)
        if s.ready_file is not None:
            tmp = s.ready_file.with_suffix(".tmp")
            tmp.write_text(
                json.dumps(
                    {
                        "service": s.service,
                        "pid": os.getpid(),
                        "grpc_port": self.port,
                        "probe_port": self.probe_port,
                        "metrics_port": self.metrics_port,
                        **self.extra_ports,
                    }
                )
            )
            tmp.replace(s.ready_file)
        _LOGGER.info(
            "listening",
            extra={"grpc_port": self.port, "probe_port": self.probe_port, "metrics_port": self.metrics_port,
                   **self.extra_ports},
        )

    async def set_serving(self, serving: bool) -> None:
        """Opens or closes the service (e.g. a sealed vault); readiness also needs its dependencies."""
        self.initially_serving = serving
        await self._publish()

    @property
    def ready(self) -> bool:
        """What ``readiness`` (and ``""`` and the service names) answer now."""
        return self.serving

    async def _publish(self) -> None:
        ready = self.initially_serving and self._deps_ok and self._stop_deadline is None
        changed = ready != self.serving
        self.serving = ready
        self._ready_gauge.set(1 if ready else 0)
        status = _SERVING if ready else _NOT_SERVING
        await self.health.set(READINESS, status)
        await self.health.set("", status)
        for name in self._service_names:
            await self.health.set(name, status)
        if changed and self.port:
            _LOGGER.log(logging.INFO if ready else logging.WARNING, "readiness changed", extra={"ready": ready})

    async def _check_readiness(self) -> bool:
        assert self._readiness is not None
        try:
            return bool(await asyncio.wait_for(self._readiness(), max(self.readiness_interval_s * 2, 1.0)))
        except Exception as err:  # a check that fails or hangs means "not ready", never a crash
            _LOGGER.debug("readiness check failed", extra={"error": f"{type(err).__name__}: {err}"})
            return False

    async def _readiness_loop(self) -> None:
        while self._stop_deadline is None:
            await asyncio.sleep(self.readiness_interval_s)
            ok = await self._check_readiness()
            if ok != self._deps_ok and self._stop_deadline is None:
                self._deps_ok = ok
                await self._publish()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT start a graceful stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)

    async def wait(self) -> None:
        """Blocks until asked to stop, then stops gracefully."""
        await self._stopping.wait()
        await self.stop()

    def time_left(self) -> float:
        """Seconds left of the grace period once a stop has begun (the whole grace before)."""
        if self._stop_deadline is None:
            return self.settings.grace_seconds
        return max(self._stop_deadline - time.monotonic(), 0.0)

    async def stop(self) -> None:
        """NOT_SERVING, drain in-flight calls, close everything: all within one grace period."""
        _LOGGER.info("shutting down", extra={"grace_seconds": self.settings.grace_seconds})
        self._stop_deadline = time.monotonic() + self.settings.grace_seconds
        self.guard.draining = True
        if self._readiness_task is not None:
            self._readiness_task.cancel()
        await self.health.enter_graceful_shutdown()
        self.serving = False
        self._ready_gauge.set(0)
        # Give probes a moment to see NOT_SERVING before the port goes away.
        await asyncio.sleep(min(0.5, self.settings.grace_seconds / 4))
        await asyncio.gather(self.server.stop(self.time_left()),
                             *(listener.stop(self.time_left()) for listener in self._listeners))
        for closer in reversed(self._closers):
            try:
                # Closers get what is left of the grace, and a moment more to release resources.
                await asyncio.wait_for(closer(), self.time_left() + _CLOSE_FLOOR_S)
            except TimeoutError:
                _LOGGER.error("a closer did not finish within the grace period")
            except Exception:
                _LOGGER.exception("error while closing")
        await self.probe_server.stop(0)
        shutdown_tracing()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
        _LOGGER.info("stopped")
