"""One bounded HTTPS GET of a SPIFFE bundle endpoint (SPIFFE_Federation.md §5), and its two profiles.

:func:`fetch` opens one connection, authenticates the server (the TLS context of the profile, then
its ``check_peer``), sends ``GET`` and reads the answer with h11, sans-IO, so that every read has a
deadline: the whole fetch (connect, handshake, request and the complete body) must finish within
``timeout`` seconds, however slowly the server trickles bytes, and the body may not exceed
``max_body_bytes``. Every redirect is refused (§7.5.1 lets a client disable them; following one
would let a transient compromise of the endpoint point us somewhere else), and so is every status
but 200. A failure is one :class:`FetchError` whose message says what happened.

Profiles (§5.2):

* ``https_web`` (:func:`web_pki_context`): RFC 6125 hostname verification against the configured CA
  file or the system roots, like any HTTPS client.
* ``https_spiffe`` (:func:`spiffe_context` and :class:`SpiffePeerCheck`): the server certificate
  must be an X.509-SVID (X509-SVID.md §4, §5) of exactly the configured SPIFFE ID, chaining to the
  X.509 authorities of the trust domain's own current bundle; host names play no part.

Name resolution (``getaddrinfo``) is the one step the deadline cannot cut; it runs in the source's
background thread, never on a request.

Imports only ``sts.spiffeid`` of the project.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import h11
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from sts.spiffeid import SpiffeId, SpiffeIdError

MAX_BODY_BYTES = 1024 * 1024
"""The largest bundle accepted (1 MiB; a bundle of a hundred keys is a few tens of KiB)."""
FETCH_TIMEOUT_SECONDS = 10.0
"""The whole fetch: connect, TLS handshake, request and the complete answer."""
MAX_HEAD_BYTES = 16 * 1024
_READ_BYTES = 64 * 1024
USER_AGENT = "sts-bundle-client"

PeerCheck = Callable[[tuple[x509.Certificate, ...]], None]
"""Called with the verified chain (leaf first) after the handshake, before the request; raises
:class:`FetchError` to refuse the server."""


class FetchError(Exception):
    """One fetch failed; the message says why (it is logged and shown in ``/readyz``)."""


@dataclass(frozen=True, slots=True)
class Fetched:
    """The body of a 200 answer and the server's chain (leaf first; for https_spiffe the verified
    chain, ending with the authority it was verified against)."""

    body: bytes
    chain: tuple[x509.Certificate, ...]
    elapsed: float


def web_pki_context(ca_file: Path | None) -> ssl.SSLContext:
    """``https_web`` (§5.2.1.4): hostname verification, ``ca_file`` (PEM) or the system roots.

    Raises ``OSError`` or ``ssl.SSLError`` when the file cannot be read or holds no certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        context.load_verify_locations(cafile=str(ca_file))  # SSLError when it holds no certificate
    return context


def spiffe_context(authorities: Sequence[x509.Certificate]) -> ssl.SSLContext:
    """``https_spiffe`` (§5.2.2.4): the chain must end at one of ``authorities`` (the partner's own
    X.509 authorities, each a trust anchor even when it is an intermediate: partial chains are
    allowed); no host name is checked. :class:`SpiffePeerCheck` checks the SVID itself."""
    if not authorities:
        raise FetchError("no X.509 authority to authenticate the endpoint with")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # the SPIFFE ID is the server's identity, not its network name
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    pem = "".join(c.public_bytes(Encoding.PEM).decode("ascii") for c in authorities)
    context.load_verify_locations(cadata=pem)
    return context


class SpiffePeerCheck:
    """X509-SVID.md §4 and §5 on the server's leaf, after OpenSSL verified the chain and its validity:
    exactly one URI SAN, the configured SPIFFE ID; not a CA; key usage digitalSignature without
    certificate or CRL signing."""

    def __init__(self, expected: SpiffeId) -> None:
        self.expected = expected

    def __call__(self, chain: tuple[x509.Certificate, ...]) -> None:
        if not chain:
            raise FetchError("the endpoint presented no certificate")
        leaf = chain[0]
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if len(uris) != 1:
            raise FetchError(f"the endpoint's certificate has {len(uris)} URI SANs; an X.509-SVID has one")
        try:
            presented = SpiffeId.parse(uris[0])
        except SpiffeIdError as e:
            raise FetchError(f"the endpoint's URI SAN is not a SPIFFE ID: {e}") from e
        if presented != self.expected:
            raise FetchError(f"the endpoint presented {presented}, not the configured {self.expected}")
        try:
            constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
            usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound as e:
            raise FetchError("the endpoint's certificate lacks basic constraints or key usage") from e
        if constraints.ca:
            raise FetchError("the endpoint's certificate is a CA certificate, not a leaf X.509-SVID")
        if not usage.digital_signature or usage.key_cert_sign or usage.crl_sign:
            raise FetchError("the endpoint's certificate key usage is not that of a leaf X.509-SVID")


def fetch(
    url: str,
    context: ssl.SSLContext,
    *,
    check_peer: PeerCheck | None = None,
    timeout: float = FETCH_TIMEOUT_SECONDS,
    max_body_bytes: int = MAX_BODY_BYTES,
    clock: Callable[[], float] = time.monotonic,
) -> Fetched:
    """GET ``url`` (an https URL the configuration checked) with ``context``; see the module docstring."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    started = clock()
    deadline = started + timeout

    def remaining() -> float:
        left = deadline - clock()
        if left <= 0:
            raise FetchError(f"no complete answer within {timeout:g} s")
        return left

    try:
        raw = socket.create_connection((host, port), timeout=remaining())
    except TimeoutError as e:
        raise FetchError(f"cannot connect to {host}:{port} within {timeout:g} s") from e
    except OSError as e:
        raise FetchError(f"cannot connect to {host}:{port}: {e.strerror or e}") from e
    with raw:
        tls = _handshake(raw, context, host, remaining)
        with tls:
            chain = _peer_chain(tls)
            if check_peer is not None:
                check_peer(chain)
            body = _exchange(
                tls, parts.netloc, target, remaining, timeout=timeout, max_body_bytes=max_body_bytes
            )
    return Fetched(body, chain, clock() - started)


def _handshake(
    raw: socket.socket, context: ssl.SSLContext, host: str, remaining: Callable[[], float]
) -> ssl.SSLSocket:
    try:
        tls = context.wrap_socket(raw, server_hostname=host, do_handshake_on_connect=False)
        tls.settimeout(remaining())
        tls.do_handshake()  # one deadline for the whole handshake (CPython's SSL calls use it so)
    except ssl.SSLCertVerificationError as e:
        raise FetchError(f"the endpoint's certificate is not trusted: {e.verify_message}") from e
    except TimeoutError as e:
        raise FetchError("the TLS handshake did not finish in time") from e
    except (ssl.SSLError, OSError) as e:
        raise FetchError(f"the TLS handshake failed: {e}") from e
    return tls


def _exchange(
    tls: ssl.SSLSocket,
    authority: str,
    target: str,
    remaining: Callable[[], float],
    *,
    timeout: float,
    max_body_bytes: int,
) -> bytes:
    """Send the GET and read one 200 answer whole, with h11 parsing (chunked or sized bodies)."""
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    request = h11.Request(
        method="GET",
        target=target,
        headers=[
            ("Host", authority),
            ("Accept", "application/json"),
            ("User-Agent", USER_AGENT),
            ("Connection", "close"),
        ],
    )
    body = bytearray()
    try:
        tls.settimeout(remaining())
        tls.sendall((connection.send(request) or b"") + (connection.send(h11.EndOfMessage()) or b""))
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                tls.settimeout(remaining())
                try:
                    data = tls.recv(_READ_BYTES)
                except ssl.SSLEOFError:
                    data = b""  # closed without close_notify: an end of data like any other (h11 frames)
                connection.receive_data(data)
            elif isinstance(event, h11.Response):
                _check_response(event, max_body_bytes)
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_body_bytes:
                    raise FetchError(f"the bundle is larger than {max_body_bytes} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise FetchError("the endpoint closed the connection before the answer was complete")
            # h11.InformationalResponse (1xx): skipped; the final answer follows.
    except TimeoutError as e:
        raise FetchError(f"no complete answer within {timeout:g} s") from e
    except h11.RemoteProtocolError as e:
        raise FetchError(f"the endpoint's answer is not valid HTTP/1.1: {e}") from e
    except (ssl.SSLError, OSError) as e:
        raise FetchError(f"reading the answer failed: {e}") from e


def _check_response(response: h11.Response, max_body_bytes: int) -> None:
    # h11 bounds a head that is still incomplete; one that arrived whole in a read is bounded here.
    head = 16 + len(response.reason) + sum(len(n) + len(v) + 4 for n, v in response.headers)
    if head > MAX_HEAD_BYTES:
        raise FetchError(f"the answer's head is larger than {MAX_HEAD_BYTES} bytes")
    headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in response.headers}
    if 300 <= response.status_code < 400:
        location = headers.get("location", "")[:200]
        raise FetchError(
            f"the endpoint answered a redirect ({response.status_code} to {location!r}); "
            "redirects are refused: configure the URL the bundle is served at"
        )
    if response.status_code != 200:
        raise FetchError(f"the endpoint answered HTTP {response.status_code}, not 200")
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length[:20]) > max_body_bytes:
        raise FetchError(f"the bundle is larger than {max_body_bytes} bytes (Content-Length {length[:20]})")


def _peer_chain(tls: ssl.SSLSocket) -> tuple[x509.Certificate, ...]:
    """The verified chain (leaf first, ending with the trust anchor), else the presented one, else the
    leaf. ``get_verified_chain`` is public from Python 3.13; before, the same C method is reached
    through ``_sslobj``."""
    for name in ("get_verified_chain", "get_unverified_chain"):
        getter = getattr(tls, name, None) or getattr(getattr(tls, "_sslobj", None), name, None)
        if getter is None:
            continue
        chain = getter() or []
        ders = [c if isinstance(c, bytes) else c.public_bytes(_DER) for c in chain if c is not None]
        if ders:
            return tuple(x509.load_der_x509_certificate(der) for der in ders)
    der = tls.getpeercert(binary_form=True)
    return (x509.load_der_x509_certificate(der),) if der else ()


_DER = getattr(ssl, "_ssl").ENCODING_DER  # noqa: B009 (the private module's constant, 3.10-3.12)
