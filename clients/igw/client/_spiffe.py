"""The server's SPIFFE identity, checked on every connection: gRPC through a local mTLS tunnel.

grpcio's TLS checks a server certificate against a DNS name, an IP address or a common name,
never against a URI SAN, and offers no way to plug in a verifier. A SPIFFE identity lives in
the URI SAN, and certificates from cert-manager (``uris:``) or SPIRE may carry nothing else.
So the TLS handshake to an igw service is done here, with Python's ``ssl``:

- the chain is verified against the CA bundle (``CERT_REQUIRED``; no hostname check),
- the server must present exactly one URI SAN and it must be the expected SPIFFE id,
- only then are bytes forwarded between the gRPC channel and the server.

The gRPC channel talks plaintext HTTP/2 to a unix socket in a private directory (mode 0700),
so only this user's processes can reach the tunnel's entrance. Each new connection reads the
certificate, key and CA files again when they changed on disk: rotated certificates are used
by new connections without a restart, and connections already open keep working.

Only the standard library is used: agents install grpcio and protobuf, nothing else.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PeerRefused", "SpiffeTunnel", "TlsFiles", "TunnelThread", "peer_spiffe_ids"]

_LOGGER = logging.getLogger(__name__)
_CONNECT_TIMEOUT_S = 10.0
_CHUNK = 256 * 1024
_HIGH_WATER = 4 * 1024 * 1024


class PeerRefused(Exception):
    """The server's certificate does not name the expected SPIFFE identity."""


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size, st.st_ino


@dataclass
class TlsFiles:
    """Our certificate, key and CA bundle on disk; the SSL context follows the files as they change."""

    cert: Path
    key: Path
    ca: Path
    _stamps: tuple[tuple[int, int, int], ...] = field(default=(), init=False, repr=False)
    _context: ssl.SSLContext | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    #: How many times the files were (re)loaded; tests and metrics read it.
    loads: int = field(default=0, init=False)

    def stamps(self) -> tuple[tuple[int, int, int], ...]:
        """(mtime, size, inode) of the three files: changes when any is replaced or rewritten."""
        return tuple(_stamp(p) for p in (self.cert, self.key, self.ca))

    def context(self) -> ssl.SSLContext:
        """A client SSL context for the files as they are now (rebuilt only when they changed).

        A half-written rotation (a key that does not match its certificate yet) keeps the
        previous context until the files agree again.
        """
        with self._lock:
            try:
                stamps = self.stamps()
            except OSError:
                if self._context is None:
                    raise
                return self._context
            if self._context is None or stamps != self._stamps:
                try:
                    self._context = client_context(self.cert, self.key, self.ca)
                    self._stamps = stamps
                    self.loads += 1
                except (OSError, ssl.SSLError):
                    if self._context is None:
                        raise
                    _LOGGER.warning("TLS files changed but do not load yet; keeping the previous ones")
            return self._context


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """mTLS client context: present ``cert``, trust only ``ca``, offer HTTP/2, no hostname check."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # The identity check is the URI SAN (below), not a host name: DNS names are optional.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["h2"])
    return ctx


def peer_spiffe_ids(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[str]:
    """The URI SANs of the verified peer certificate."""
    cert = ssl_object.getpeercert()
    if not cert:
        return []
    sans: Any = cert.get("subjectAltName", ())
    return [str(v) for k, v in sans if k == "URI"]


def check_peer(ssl_object: ssl.SSLObject | ssl.SSLSocket, expected_id: str) -> None:
    """Raises PeerRefused unless the peer's one URI SAN is ``expected_id`` and it is no CA."""
    ids = peer_spiffe_ids(ssl_object)
    if ids != [expected_id]:
        shown = ", ".join(ids) if ids else "no URI SAN"
        raise PeerRefused(f"server presented {shown}; expected exactly {expected_id}")
    der = ssl_object.getpeercert(binary_form=True)
    if der and _is_ca(der):
        raise PeerRefused("server presented a CA certificate as its identity")


def _is_ca(der: bytes) -> bool:
    """True when the certificate says CA=true (checked with ``cryptography`` when it is installed)."""
    try:
        from cryptography import x509
    except ImportError:  # an agent's environment: the CA itself never carries a service's URI SAN
        return False
    try:
        bc = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return False
    except ValueError:
        return True
    return bool(bc.value.ca)


_PREFIX = "igw-tls-"
# Directories of tunnels not closed yet, removed at exit if their owner never closed them.
_OPEN_DIRS: set[str] = set()
_SWEPT = threading.Event()
_STALE_AFTER_S = 60.0


@atexit.register
def _remove_open_dirs() -> None:
    for d in list(_OPEN_DIRS):
        shutil.rmtree(d, ignore_errors=True)


def _owner_alive(name: str) -> bool:
    """Whether the process named in ``igw-tls-<pid>-<random>`` still runs."""
    pid_text = name[len(_PREFIX):].split("-", 1)[0]
    if not pid_text.isdigit():
        return True  # not named by its owner: leave it alone
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale_dirs() -> None:
    """Removes tunnel directories left by processes that died without cleaning up (kill -9).

    This user's only, older than a minute, whose owning process is gone; once per process.
    """
    if _SWEPT.is_set():
        return
    _SWEPT.set()
    root = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(root) if n.startswith(_PREFIX)]
    except OSError:
        return
    now = time.time()
    for name in names:
        d = os.path.join(root, name)
        try:
            st = os.lstat(d)
        except OSError:
            continue
        if st.st_uid == os.getuid() and now - st.st_mtime >= _STALE_AFTER_S and not _owner_alive(name):
            shutil.rmtree(d, ignore_errors=True)


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` -> (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


class SpiffeTunnel:
    """A private unix socket whose connections reach ``upstream`` over mTLS, once it proved ``expected_id``.

    The listening socket is bound at construction, so a channel may dial ``target`` at once;
    connections wait in the backlog until :meth:`start` runs inside an event loop.
    """

    def __init__(
        self, upstream: str, expected_id: str, files: TlsFiles, *,
        on_refused: Callable[[str, str], None] | None = None,
    ) -> None:
        self.upstream = upstream
        self.expected_id = expected_id
        self.files = files
        self.refusals = 0
        self.connections = 0
        self._on_refused = on_refused
        _sweep_stale_dirs()
        self._dir = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
        _OPEN_DIRS.add(self._dir)
        self.path = os.path.join(self._dir, "tunnel.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(256)
        self._sock.setblocking(False)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def target(self) -> str:
        """The gRPC target to dial (with insecure channel credentials: TLS happens here)."""
        return f"unix:{self.path}"

    async def start(self) -> None:
        """Starts accepting (call inside the loop that should carry the bytes)."""
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Entrance(self), sock=self._sock, start_serving=True
        )

    async def close(self) -> None:
        """Stops accepting, cuts the open connections and removes the socket."""
        if self._server is not None:
            self._server.close()
        else:
            self._sock.close()
        for task in list(self._tasks):
            task.cancel()
        shutil.rmtree(self._dir, ignore_errors=True)
        _OPEN_DIRS.discard(self._dir)

    def refused(self, why: str) -> None:
        self.refusals += 1
        _LOGGER.error("server identity refused", extra={"upstream": self.upstream, "error": why})
        if self._on_refused is not None:
            self._on_refused(self.upstream, why)


class _Upstream(asyncio.Protocol):
    """The TLS side: bytes from the server go back to the channel's side."""

    def __init__(self, entrance: _Entrance) -> None:
        self.entrance = entrance
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.entrance.send_down(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.entrance.close()

    def pause_writing(self) -> None:
        self.entrance.pause_reading()

    def resume_writing(self) -> None:
        self.entrance.resume_reading()


class _Entrance(asyncio.Protocol):
    """The gRPC channel's side of one tunnelled connection."""

    def __init__(self, tunnel: SpiffeTunnel) -> None:
        self.tunnel = tunnel
        self.transport: asyncio.Transport | None = None
        self.upstream: _Upstream | None = None
        self.pending: list[bytes] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.tunnel.connections += 1
        task = asyncio.get_running_loop().create_task(self._connect())
        self.tunnel._tasks.add(task)
        task.add_done_callback(self.tunnel._tasks.discard)

    async def _connect(self) -> None:
        t = self.tunnel
        try:
            host, port = split_host_port(t.upstream)
            ctx = t.files.context()
            loop = asyncio.get_running_loop()
            transport, proto = await asyncio.wait_for(
                loop.create_connection(lambda: _Upstream(self), host, port, ssl=ctx, server_hostname=""),
                _CONNECT_TIMEOUT_S,
            )
            sslobj = transport.get_extra_info("ssl_object")
            check_peer(sslobj, t.expected_id)
        except PeerRefused as err:
            t.refused(str(err))
            with contextlib.suppress(Exception):
                transport.abort()
            self.close()
            return
        except ssl.SSLCertVerificationError as err:
            # A chain that does not lead to our CA bundle is an identity refusal too.
            t.refused(f"server certificate not trusted: {err.verify_message}")
            self.close()
            return
        except (OSError, ssl.SSLError, TimeoutError, ValueError) as err:
            _LOGGER.debug("tunnel connect failed", extra={"upstream": t.upstream, "error": str(err)})
            self.close()
            return
        if self.closed:
            transport.close()
            return
        self.upstream = proto
        for chunk in self.pending:
            transport.write(chunk)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.write(data)
        else:
            self.pending.append(data)

    def send_down(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


class TunnelThread:
    """Runs tunnels on a private event loop in a daemon thread, for blocking callers (sync client, CLI)."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._tunnels: list[SpiffeTunnel] = []
        self._thread = threading.Thread(target=self._loop.run_forever, name="igw-tls-tunnel", daemon=True)
        self._thread.start()

    def open(self, upstream: str, expected_id: str, files: TlsFiles) -> SpiffeTunnel:
        """A started tunnel (its socket accepts at once)."""
        tunnel = SpiffeTunnel(upstream, expected_id, files)
        asyncio.run_coroutine_threadsafe(tunnel.start(), self._loop).result(10)
        self._tunnels.append(tunnel)
        return tunnel

    def close(self) -> None:
        """Closes every tunnel and stops the thread."""
        if self._loop.is_closed():
            return

        async def _close() -> None:
            for t in self._tunnels:
                await t.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self._loop.close()
