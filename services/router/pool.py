"""Every ledger and vault replica, one channel each, picked round-robin among the healthy ones.

Why client-side balancing in the router (and not gRPC's built-in ``round_robin`` over one
channel): the server's identity is checked per upstream address, by gRPC's own TLS when the
replica's certificate states it as a DNS name, else by a TLS tunnel (gRPC's own TLS cannot check
a URI SAN; ``services/router/upstream_tls.py``), so each replica is its own channel. Per replica
the pool keeps:

- its health as the replica pushes it: a ``grpc.health.v1`` ``Watch`` stream on the replica's own
  service name, which mirrors its readiness (a ledger that cannot reach Postgres, or one that is
  draining, drops out the moment it says so). Nothing runs while nothing changes; a ``Check`` every
  few seconds (``liveness_interval_s``) still catches a replica that hangs with its stream open, and a
  replica that is unhealthy, or whose stream ended, is checked every second until it is back;
- the channel state: a replica whose connection failed is skipped at once, before its next
  health check, so a killed replica costs only the calls that were in flight on it.

Calls go round-robin over the replicas that are SERVING and not in TRANSIENT_FAILURE, else over
all of them (the call then fails with the replica's own, retryable, UNAVAILABLE). Addresses are
``host:port`` lists; a host name that resolves to several addresses (a Kubernetes headless
Service) becomes one replica per address, re-resolved every few seconds.
Certificate rotation: when the router's certificate, key or CA files change, every replica
gets a fresh channel (new connections, new certificate) and the old one is closed after the
calls on it finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from igw.client._spiffe import SpiffeTunnel, TlsFiles, split_host_port
from services.common.tls import CHANNEL_OPTIONS
from services.router.upstream_tls import native_channel, probe

_LOGGER = logging.getLogger(__name__)
_OLD_CHANNEL_GRACE_S = 30.0
# A native replica unreachable for this many health checks in a row is probed again.
_REPROBE_AFTER_FAILURES = 3


@dataclass
class Replica:
    """One upstream address: its current channel (and tunnel, in tunnel mode), its last known health.

    ``mode`` is how its identity is checked: ``native`` (gRPC's TLS, the identity's DNS name) or
    ``tunnel`` (the URI SAN, in Python); ``decided`` is false while no probe reached it yet.
    """

    address: str
    channel: grpc.aio.Channel
    mode: str
    tunnel: SpiffeTunnel | None = None
    decided: bool = True
    failures: int = 0
    healthy: bool = False
    watching: bool = False  # its Watch stream is open and has answered
    checked_at: float = 0.0  # loop time of its last Check
    watcher: asyncio.Task[None] | None = None
    stubs: dict[type, Any] = field(default_factory=dict)

    def stub(self, cls: type) -> Any:
        s = self.stubs.get(cls)
        if s is None:
            s = self.stubs[cls] = cls(self.channel)
        return s

    def usable(self) -> bool:
        return self.healthy and self.channel.get_state() != grpc.ChannelConnectivity.TRANSIENT_FAILURE


class ReplicaPool:
    """The replicas of one service (``ledger`` or ``keyvault``) as seen by this router."""

    def __init__(
        self, service: str, addresses: Sequence[str], expected_id: str, files: TlsFiles, health_name: str, *,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (), check_interval_s: float = 1.0,
        resolve_interval_s: float = 5.0, on_change: Callable[[], None] | None = None,
        identity_check: str = "auto", probe_timeout_s: float = 5.0, liveness_interval_s: float = 5.0,
    ) -> None:
        self.service = service
        self.entries = [a.strip() for a in addresses if a.strip()]
        if not self.entries:
            raise ValueError(f"no {service} address")
        self.expected_id = expected_id
        self.files = files
        self.health_name = health_name
        self.interceptors = list(interceptors)
        self.check_interval_s = check_interval_s
        self.liveness_interval_s = liveness_interval_s
        self.resolve_interval_s = resolve_interval_s
        self.identity_check = identity_check
        self.probe_timeout_s = probe_timeout_s
        self.replicas: dict[str, Replica] = {}
        self._rr = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        # Channels replaced while calls may still run on them (closed after a grace, or at close()).
        self._retiring: dict[grpc.aio.Channel, SpiffeTunnel | None] = {}
        self._retire_tasks: set[asyncio.Task[None]] = set()
        self._on_change = on_change
        self._stamps = files.stamps()
        self._closing = False
        self.channel_generation = 0

    # ------------------------------------------------------------------ lifecycle

    def _channel(self, address: str, mode: str, tunnel: SpiffeTunnel | None) -> grpc.aio.Channel:
        if mode == "native":
            ch = native_channel(address, self.files, self.expected_id, self.interceptors)
        else:
            assert tunnel is not None
            options = [*CHANNEL_OPTIONS, ("grpc.default_authority", address)]
            ch = grpc.aio.insecure_channel(tunnel.target, options=options, interceptors=self.interceptors or None)
        ch.get_state(try_to_connect=True)
        return ch

    async def _decide(self, address: str) -> tuple[str, bool]:
        """(mode, decided) for a replica: native only when a probe saw the identity and its DNS name."""
        if self.identity_check == "uri":
            return "tunnel", True
        seen = await probe(address, self.expected_id, self.files, self.probe_timeout_s)
        if seen.verdict == "refused":
            _LOGGER.error("replica identity refused", extra={"service": self.service, "address": address,
                                                             "error": seen.why})
        return ("native" if seen.verdict == "native" else "tunnel"), seen.verdict != "unreachable"

    async def _set_mode(self, rep: Replica, mode: str) -> None:
        """Gives ``rep`` a channel (and tunnel) for ``mode``; the old channel closes after its calls."""
        old_channel, old_tunnel = rep.channel, rep.tunnel
        rep.mode = mode
        if mode == "native":
            rep.tunnel = None
        elif rep.tunnel is None:
            rep.tunnel = await self._tunnel(rep.address)
        rep.channel = self._channel(rep.address, mode, rep.tunnel)
        rep.stubs.clear()
        rep.failures = 0
        self._watch(rep)
        _LOGGER.info("replica identity check", extra={"service": self.service, "address": rep.address,
                                                      "identity_check": mode})
        self._retiring[old_channel] = old_tunnel if old_tunnel is not rep.tunnel else None
        task = asyncio.get_running_loop().create_task(self._retire_later(old_channel))
        self._retire_tasks.add(task)
        task.add_done_callback(self._retire_tasks.discard)

    async def _tunnel(self, address: str) -> SpiffeTunnel:
        tunnel = SpiffeTunnel(address, self.expected_id, self.files)
        await tunnel.start()
        return tunnel

    async def _retire_later(self, channel: grpc.aio.Channel) -> None:
        await channel.close(_OLD_CHANNEL_GRACE_S)
        tunnel = self._retiring.pop(channel, None)  # close() may have taken it already
        if tunnel is not None:
            await tunnel.close()

    async def _add(self, address: str) -> None:
        mode, decided = await self._decide(address)
        tunnel = await self._tunnel(address) if mode == "tunnel" else None
        rep = self.replicas[address] = Replica(address, self._channel(address, mode, tunnel), mode, tunnel, decided)
        self._watch(rep)
        _LOGGER.info("replica added", extra={"service": self.service, "address": address, "identity_check": mode})

    async def _remove(self, address: str) -> None:
        rep = self.replicas.pop(address)
        self._unwatch(rep)
        _LOGGER.info("replica removed", extra={"service": self.service, "address": address})
        self._retiring[rep.channel] = rep.tunnel
        await self._retire_later(rep.channel)

    async def start(self) -> None:
        """Resolves the addresses, opens one channel per replica, starts health checks."""
        # Probed side by side: a replica that does not answer costs the start one probe timeout.
        await asyncio.gather(*(self._add(address) for address in await self._resolve()))
        await asyncio.gather(*(self._check(r) for r in list(self.replicas.values())))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._health_loop()), loop.create_task(self._maintain_loop()),
                       loop.create_task(self._probe_loop())]

    async def close(self) -> None:
        """Stops checking and closes every channel and tunnel."""
        self._closing = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        retiring, self._retiring = self._retiring, {}
        for channel, tunnel in retiring.items():
            await channel.close()
            if tunnel is not None:
                await tunnel.close()
        for t in list(self._retire_tasks):
            t.cancel()
        for rep in list(self.replicas.values()):
            self._unwatch(rep)
            await rep.channel.close()
            if rep.tunnel is not None:
                await rep.tunnel.close()
        self.replicas.clear()

    # ------------------------------------------------------------------ picking

    def pick(self) -> Replica:
        """The next usable replica (round-robin), or any replica when none is usable."""
        reps = list(self.replicas.values())
        if not reps:
            raise RuntimeError(f"no {self.service} replica")
        n = next(self._rr)
        usable = [r for r in reps if r.usable()]
        pool = usable or reps
        return pool[n % len(pool)]

    def ready(self) -> bool:
        return any(r.usable() for r in self.replicas.values())  # at least one replica is healthy

    def healthy_count(self) -> int:
        return sum(1 for r in self.replicas.values() if r.usable())

    def stub(self, cls: type) -> Any:
        """A stub-shaped object whose every call goes to the next usable replica."""
        return BalancedStub(self, cls)

    # ------------------------------------------------------------------ background

    async def _check(self, rep: Replica) -> None:
        rep.checked_at = asyncio.get_running_loop().time()
        try:
            resp = await health_pb2_grpc.HealthStub(rep.channel).Check(  # type: ignore[no-untyped-call]
                health_pb2.HealthCheckRequest(service=self.health_name), timeout=max(self.check_interval_s, 1.0)
            )
            healthy = resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            healthy = False
        rep.failures = 0 if healthy else rep.failures + 1
        self._set_health(rep, healthy)

    def _set_health(self, rep: Replica, healthy: bool) -> None:
        before, rep.healthy = rep.healthy, healthy
        if before != healthy:
            _LOGGER.log(logging.INFO if healthy else logging.WARNING, "replica health changed",
                        extra={"service": self.service, "address": rep.address, "healthy": healthy})
            if self._on_change is not None:
                self._on_change()

    def _watch(self, rep: Replica) -> None:
        """(Re)starts ``rep``'s Watch stream on its current channel."""
        self._unwatch(rep)
        rep.watcher = asyncio.get_running_loop().create_task(self._watch_stream(rep))

    @staticmethod
    def _unwatch(rep: Replica) -> None:
        if rep.watcher is not None:
            rep.watcher.cancel()
        rep.watcher, rep.watching = None, False

    async def _watch_stream(self, rep: Replica) -> None:
        """The replica's health as it pushes it. A stream that ends (the replica stopped, or its
        connection aged out) proves nothing by itself: the health loop checks the replica at its next
        tick, and the stream is opened again a second later."""
        request = health_pb2.HealthCheckRequest(service=self.health_name)
        while True:
            try:
                stream = health_pb2_grpc.HealthStub(rep.channel).Watch(request)  # type: ignore[no-untyped-call]
                async for resp in stream:
                    rep.watching = True
                    serving = resp.status == health_pb2.HealthCheckResponse.SERVING
                    rep.failures = 0 if serving else rep.failures
                    self._set_health(rep, serving)
            except grpc.RpcError:
                pass
            rep.watching = False
            await asyncio.sleep(self.check_interval_s)

    def _due(self, rep: Replica, now: float) -> bool:
        """Whether the health loop checks ``rep`` now: unhealthy or unwatched ones every tick, the
        others every ``liveness_interval_s`` (a replica that hangs keeps its stream open)."""
        return not (rep.healthy and rep.watching) or now - rep.checked_at >= self.liveness_interval_s

    async def _health_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.check_interval_s)
            try:
                now = loop.time()
                await asyncio.gather(*(self._check(r) for r in list(self.replicas.values()) if self._due(r, now)))
            except Exception:
                _LOGGER.exception("health check round failed")

    async def _probe_loop(self) -> None:
        # Apart from the health checks: a probe of a replica that does not answer waits its timeout.
        while True:
            await asyncio.sleep(self.check_interval_s)
            try:
                await self._reprobe()
            except Exception:
                _LOGGER.exception("replica probe round failed")

    async def _reprobe(self) -> None:
        """Probes the replicas whose check is in doubt: not reached yet, or native and unreachable
        for a while (a certificate rotated to one without the identity's DNS name)."""
        if self.identity_check == "uri":
            return
        doubtful = [rep for rep in list(self.replicas.values())
                    if not rep.decided or (rep.mode == "native" and rep.failures >= _REPROBE_AFTER_FAILURES)]
        verdicts = await asyncio.gather(*(self._decide(rep.address) for rep in doubtful))
        for rep, (mode, decided) in zip(doubtful, verdicts, strict=True):
            if not decided or self.replicas.get(rep.address) is not rep:
                continue  # still unreachable (keep what it has), or removed meanwhile
            rep.decided = True
            if mode != rep.mode:
                await self._set_mode(rep, mode)
                await self._check(rep)
            rep.failures = 0

    async def _maintain_loop(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            try:
                await self._follow_files()
                if ticks % max(int(self.resolve_interval_s), 1) == 0:
                    await self._follow_dns()
            except Exception:
                _LOGGER.exception("replica maintenance failed")

    async def _follow_files(self) -> None:
        try:
            stamps = self.files.stamps()
        except OSError:
            return
        if stamps == self._stamps:
            return
        self._stamps = stamps
        self.channel_generation += 1
        _LOGGER.info("TLS files changed: new channels to every replica", extra={"service": self.service})
        for rep in list(self.replicas.values()):
            await self._set_mode(rep, rep.mode)

    async def _follow_dns(self) -> None:
        wanted = set(await self._resolve())
        if not wanted:
            return  # a DNS hiccup never empties the pool
        have = set(self.replicas)
        for address in wanted - have:
            await self._add(address)
            await self._check(self.replicas[address])
        for address in have - wanted:
            await self._remove(address)

    async def _resolve(self) -> list[str]:
        out: list[str] = []
        loop = asyncio.get_running_loop()
        for entry in self.entries:
            host, port = split_host_port(entry)
            try:
                ipaddress.ip_address(host)
                out.append(entry)
                continue
            except ValueError:
                pass
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as err:
                _LOGGER.warning("cannot resolve replica address", extra={"address": entry, "error": str(err)})
                continue
            if any(i[0] == socket.AF_INET for i in infos):
                infos = [i for i in infos if i[0] == socket.AF_INET]
            for _family, _type, _proto, _canon, sockaddr in infos:
                ip = str(sockaddr[0])
                addr = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
                if addr not in out:
                    out.append(addr)
        return out


class BalancedStub:
    """Looks like a generated stub; each method call goes to the pool's next usable replica."""

    def __init__(self, pool: ReplicaPool, cls: type) -> None:
        self._pool = pool
        self._cls = cls

    def __getattr__(self, method: str) -> Any:
        pool, cls = self._pool, self._cls

        def call(*args: Any, **kwargs: Any) -> Any:
            return getattr(pool.pick().stub(cls), method)(*args, **kwargs)

        return call
