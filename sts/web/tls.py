"""The TLS listener's context (``listen.tls``), rebuilt whenever trust changes.

The listener (``sts.web.tls_server``) asks for the context of every new connection. It is the
newest: the server's own X.509-SVID from the Workload API (or a file pair), and as client CAs every
configured trust domain's X.509 authorities. So a rotated SVID or CA is used without a restart.
Client certificates are optional at the TLS layer; OpenSSL only checks that they chain to *some*
trusted authority, and the exchange then verifies the leaf as an X.509-SVID against its *own* trust
domain's bundle (``sts.svid.X509SvidVerifier``).

Python 3.11 exposes only the leaf of the client's chain, so an SVID issued through an intermediate
fails that second check (closed, never open) until Python 3.13's ``get_verified_chain``.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from typing import Any

from cryptography.hazmat.primitives import serialization

from sts.config import TlsSettings
from sts.errors import TemporarilyUnavailable
from sts.memfile import MemoryFile
from sts.trust import TrustBundle, TrustStore
from sts.workload_api import WorkloadApiWatcher

log = logging.getLogger(__name__)


class ServerTls:
    """Builds and caches the server TLS context; thread-safe, cheap when nothing changed."""

    def __init__(self, settings: TlsSettings, trust: TrustStore, watcher: WorkloadApiWatcher | None) -> None:
        self._settings = settings
        self._trust = trust
        self._watcher = watcher
        self._lock = threading.Lock()
        self._stamp: tuple[Any, ...] | None = None
        self._context: ssl.SSLContext | None = None

    def context(self) -> ssl.SSLContext:
        """The context for the next connection; raises TemporarilyUnavailable without a certificate."""
        bundles = self._bundles()
        certificate = self._certificate_stamp()
        stamp = (certificate, *bundles)
        with self._lock:
            if self._context is None or stamp != self._stamp:
                self._context = self._build(bundles)
                self._stamp = stamp
                log.info(
                    "TLS context built (server certificate %s, %d trust domains)", certificate, len(bundles)
                )
            return self._context

    def _bundles(self) -> tuple[TrustBundle, ...]:
        found = []
        for trust_domain in sorted(self._trust.trust_domains, key=str):
            try:
                bundle = self._trust.bundle_for(trust_domain)
            except TemporarilyUnavailable:
                continue
            if bundle is not None:
                found.append(bundle)
        return tuple(found)

    def _certificate_stamp(self) -> Any:
        if self._settings.cert is not None and self._settings.key is not None:
            return tuple(os.stat(p).st_mtime_ns for p in (self._settings.cert, self._settings.key))
        own = self._watcher.own_svid() if self._watcher else None
        if own is None:
            raise TemporarilyUnavailable("no server certificate from the Workload API yet")
        return own.version

    def _build(self, bundles: tuple[TrustBundle, ...]) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load_certificate(context)
        authorities = [ca for bundle in bundles for ca in bundle.x509_authorities]
        if authorities:
            pem = b"".join(ca.public_bytes(serialization.Encoding.PEM) for ca in authorities)
            context.load_verify_locations(cadata=pem.decode("ascii"))
            context.verify_mode = ssl.CERT_OPTIONAL
        return context

    def _load_certificate(self, context: ssl.SSLContext) -> None:
        """The server certificate and key into ``context``: the configured files, or the own SVID.

        ``ssl`` loads a key only from a path, and the SVID's key must never be left on disk: it is
        handed over in :class:`~sts.memfile.MemoryFile` (anonymous memory, gone once loaded).
        """
        if self._settings.cert is not None and self._settings.key is not None:
            context.load_cert_chain(certfile=str(self._settings.cert), keyfile=str(self._settings.key))
            return
        own = self._watcher.own_svid() if self._watcher else None
        if own is None:
            raise TemporarilyUnavailable("no server certificate from the Workload API yet")
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in own.chain)
        key = own.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        with MemoryFile(chain, "svid.pem") as chain_file, MemoryFile(key, "svid.key") as key_file:
            context.load_cert_chain(certfile=chain_file.path, keyfile=key_file.path)
