"""The edge's TLS: client certificates required, and the files followed on disk as gRPC does.

Every new handshake goes through an SNI callback (OpenSSL calls it for every ClientHello, with or
without a server name) that stats the certificate, key and CA files and, when they changed and
agree with each other, swaps in a context built from them: cert-manager or SPIRE may rotate any of
the three without a restart, and a rotation caught half-written keeps the previous material.
"""

from __future__ import annotations

import logging
import ssl
import threading
from pathlib import Path

from services.common.tls import _check_pair, _stamps

_LOGGER = logging.getLogger(__name__)


def _context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """TLS 1.2+ that requires a client certificate chained to the igw CA (as gRPC's does)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class ServerTLS:
    """The listening context (``.context``) and the current material it hands each handshake."""

    def __init__(self, cert: Path, key: Path, ca: Path) -> None:
        self.paths = (cert, key, ca)
        self._lock = threading.Lock()
        self._stamps = _stamps(self.paths)
        self.current = _context(cert, key, ca)
        self.loads = 1
        self.context = _context(cert, key, ca)
        self.context.sni_callback = self._on_hello

    def _on_hello(self, sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        sslobj.context = self.refresh()

    def refresh(self) -> ssl.SSLContext:
        """The context for the next handshake, rebuilt when the files changed and load."""
        with self._lock:
            try:
                stamps = _stamps(self.paths)
                if stamps != self._stamps:
                    cert, key, ca = (p.read_bytes() for p in self.paths)
                    _check_pair(cert, key, ca)
                    self.current = _context(*self.paths)
                    self._stamps = stamps
                    self.loads += 1
                    _LOGGER.info("TLS certificate reloaded from disk (HTTPS edge)", extra={"cert": str(self.paths[0])})
            except Exception as err:  # never fail a handshake over a rotation in progress
                _LOGGER.warning("TLS files changed but do not load yet; serving with the previous ones",
                                extra={"error": str(err)})
            return self.current
