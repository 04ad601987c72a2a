"""The bundle endpoint source (issue 15, SPIFFE_Federation.md): a partner's bundle over HTTPS, both
profiles, against a real HTTPS server of the test's own on loopback, and every hostile answer.

The server (:class:`PartnerEndpoint`) is ``http.server`` + ``ssl`` in a thread; what it answers is
set per test (:class:`Answer`: a bundle, a status, a redirect, a huge or a trickling body). Time is
injectable (:class:`Clocks`), so staleness and restarts need no waiting; the source's polls are
driven with :meth:`BundleEndpointSource.refresh` except where the background thread is the point.
Helpers here are imported by ``tests/test_bundle_endpoint_serve.py``.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sts.bundle_endpoint import BundleEndpointSource, read_cache, source_from_settings
from sts.bundle_fetch import FetchError, SpiffePeerCheck, fetch, spiffe_context, web_pki_context
from sts.config import ConfigError, load_settings
from sts.errors import TemporarilyUnavailable
from sts.runtime import build_trust_store
from sts.spiffeid import SpiffeId, TrustDomain
from sts.trust import FileBundleSource, TrustStore
from tests.authority import TestAuthority, public_jwk, spiffe_ca_certificate
from tests.test_mtls_http import issue

PARTNER = TrustDomain("partner.test")
ENDPOINT_ID = "spiffe://partner.test/spire/server"
BUNDLE_PATH = "/bundle.json"


# ---- the partner's bundle and its endpoint -------------------------------------------------------


def bundle_document(
    authority: TestAuthority,
    *,
    sequence: int | None = None,
    hint: int | None = 1,
    jwt: bool = True,
    x509_ca: bool = True,
    extra_keys: tuple[dict[str, Any], ...] = (),
) -> bytes:
    """The authority's SPIFFE bundle with this sequence (default: the authority's), refresh hint and keys."""
    document = json.loads(authority.spiffe_bundle())
    keys = [
        k
        for k in document["keys"]
        if (jwt or k["use"] != "jwt-svid") and (x509_ca or k["use"] != "x509-svid")
    ]
    document["keys"] = keys + list(extra_keys)
    document["spiffe_sequence"] = authority.sequence if sequence is None else sequence
    if hint is None:
        del document["spiffe_refresh_hint"]
    else:
        document["spiffe_refresh_hint"] = hint
    if sequence is None and authority.sequence is None:
        del document["spiffe_sequence"]
    return json.dumps(document).encode()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        answer = self.server.endpoint.answer
        if answer.delay:
            time.sleep(answer.delay)
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        if answer.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif not answer.unframed:
            self.send_header("Content-Length", str(len(answer.body)))
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            if answer.chunked:
                for start in range(0, len(answer.body), 65536):
                    piece = answer.body[start : start + 65536]
                    self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            elif answer.trickle:
                for byte in answer.body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(answer.trickle)
            else:
                self.wfile.write(answer.body)
        except OSError:
            pass  # the client gave up on us (deadline, size): that is the point
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    endpoint: PartnerEndpoint
    requests: list[str]

    def get_request(self) -> tuple[Any, Any]:
        sock, address = self.socket.accept()
        # The handshake runs in the handler's thread (on its first read), with the certificate of now.
        return self.endpoint.context.wrap_socket(sock, server_side=True), address

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # refused handshakes and clients that hang up are what these tests make happen


class PartnerEndpoint:
    """An HTTPS server on 127.0.0.1 presenting ``cert``; :attr:`answer` is what it serves now."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.use_certificate(cert, key)
        self.server = _Server(("127.0.0.1", 0), _Handler, bind_and_activate=True)
        self.server.endpoint = self
        self.server.requests = []
        self.answer = Answer()
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()

    def use_certificate(self, cert: Path, key: Path) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        self.context = context

    def url(self, host: str = "127.0.0.1", path: str = BUNDLE_PATH) -> str:
        return f"https://{host}:{self.port}{path}"

    def serve(self, body: bytes, **kwargs: Any) -> None:
        self.answer = Answer(body, **kwargs)

    @property
    def requests(self) -> list[str]:
        return self.server.requests

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Answer:
    """What the endpoint answers: status, headers, body; ``trickle`` sends the body one byte per
    ``trickle`` seconds (slowloris), ``delay`` waits before the head, ``chunked`` sends chunks."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    trickle: float = 0.0
    delay: float = 0.0
    chunked: bool = False
    unframed: bool = False  # no length: the body ends when the connection does


class Clocks:
    """A monotonic and a wall clock that advance together, for staleness without waiting."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = time.time()

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def spiffe_endpoint_certificate(
    authority: TestAuthority, directory: Path, name: str = "endpoint", **kwargs: Any
) -> tuple[Path, Path]:
    """The endpoint's X.509-SVID (``ENDPOINT_ID`` unless ``uris`` says otherwise), signed by ``authority``."""
    kwargs.setdefault("uris", (ENDPOINT_ID,))
    cert, key, _ = issue(authority, directory, name, **kwargs)
    return cert, key


def web_certificate(
    authority: TestAuthority, directory: Path, name: str = "web", host: str = "localhost"
) -> tuple[Path, Path]:
    """A WebPKI-style server certificate for ``host`` (DNS SAN only), signed by ``authority``'s CA."""
    cert, key, _ = issue(authority, directory, name, uris=(), dns=(host,))
    return cert, key


@pytest.fixture
def partner() -> TestAuthority:
    return TestAuthority("partner.test")


@pytest.fixture
def web_ca(tmp_path: Path) -> TestAuthority:
    return TestAuthority("webpki.test")


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


@pytest.fixture
def spiffe_endpoint(tmp_path: Path, partner: TestAuthority) -> Iterator[PartnerEndpoint]:
    endpoint = PartnerEndpoint(*spiffe_endpoint_certificate(partner, tmp_path))
    endpoint.serve(bundle_document(partner))
    yield endpoint
    endpoint.close()


@pytest.fixture
def web_endpoint(tmp_path: Path, partner: TestAuthority, web_ca: TestAuthority) -> Iterator[PartnerEndpoint]:
    endpoint = PartnerEndpoint(*web_certificate(web_ca, tmp_path))
    endpoint.serve(bundle_document(partner))
    yield endpoint
    endpoint.close()


def spiffe_source(
    endpoint: PartnerEndpoint, partner: TestAuthority, tmp_path: Path, clocks: Clocks, **kwargs: Any
) -> BundleEndpointSource:
    options: dict[str, Any] = {
        "max_staleness": 60.0,
        "cache_file": tmp_path / "state" / "bundles" / "partner.test.json",
        "min_refresh": 0.05,
        "fetch_timeout": 2.0,
        "clock": clocks.monotonic,
        "wall": clocks.time,
    } | kwargs
    return BundleEndpointSource(
        PARTNER,
        endpoint.url(),
        profile="https_spiffe",
        spiffe_id=SpiffeId.parse(ENDPOINT_ID),
        bootstrap=partner.bundle(),
        **options,
    )


def web_source(
    endpoint: PartnerEndpoint, web_ca: TestAuthority, tmp_path: Path, clocks: Clocks, **kwargs: Any
) -> BundleEndpointSource:
    ca_file = tmp_path / "web-ca.pem"
    ca_file.write_bytes(web_ca.ca_pem())
    options: dict[str, Any] = {
        "max_staleness": 60.0,
        "cache_file": tmp_path / "state" / "bundles" / "partner.test.json",
        "min_refresh": 0.05,
        "fetch_timeout": 2.0,
        "clock": clocks.monotonic,
        "wall": clocks.time,
        "ca_file": ca_file,
    } | kwargs
    return BundleEndpointSource(PARTNER, endpoint.url("localhost"), profile="https_web", **options)


# ---- fetching and serving, both profiles ---------------------------------------------------------


def test_https_spiffe_fetches_the_partner_bundle_and_serves_it(
    spiffe_endpoint: PartnerEndpoint, partner: TestAuthority, tmp_path: Path, clocks: Clocks
) -> None:
    source = spiffe_source(spiffe_endpoint, partner, tmp_path, clocks)
    with pytest.raises(TemporarilyUnavailable, match=r"no trust bundle for partner\.test"):
        source.current()  # the bootstrap bundle authenticates the endpoint, it never verifies SVIDs
    delay = source.refresh()
    bundle = source.current()
    assert set(bundle.jwt_authorities) == {partner.kid}
    assert bundle.x509_authorities == (partner.ca_cert,)
    assert bundle.sequence == partner.sequence
    assert delay == pytest.approx(1.0)  # the refresh hint of the served bundle
    assert spiffe_endpoint.requests == [BUNDLE_PATH]
    described = source.describe()
    assert described["source"] == "bundle_endpoint"
    assert described["endpoint_profile"] == "https_spiffe"
    assert described["sequence"] == partner.sequence
    assert described["last_refresh"] == pytest.approx(clocks.wall, abs=0.01)
    assert described["age_seconds"] == 0
    assert described["last_error"] is None
    clocks.advance(7)
    assert source.describe()["age_seconds"] == 7


def test_https_web_fetches_with_hostname_verification_against_the_configured_ca(
    web_endpoint: PartnerEndpoint,
    partner: TestAuthority,
    web_ca: TestAuthority,
    tmp_path: Path,
    clocks: Clocks,
) -> None:
    source = web_source(web_endpoint, web_ca, tmp_path, clocks)
    source.refresh()
    assert set(source.current().jwt_authorities) == {partner.kid}
    assert source.describe()["endpoint_profile"] == "https_web"


@pytest.mark.parametrize("framing", ["chunked", "unframed"])
def test_a_bundle_without_content_length_is_read_whole(
    framing: str, spiffe_endpoint: PartnerEndpoint, partner: TestAuthority, tmp_path: Path, clocks: Clocks
) -> None:
    spiffe_endpoint.serve(bundle_document(partner), **{framing: True})
    source = spiffe_source(spiffe_endpoint, partner, tmp_path, clocks)
    source.refresh()
    assert source.describe()["last_error"] is None
    assert set(source.current().jwt_authorities) == {partner.kid}


def test_https_web_refuses_a_certificate_of_another_host(
    web_endpoint: PartnerEndpoint, web_ca: TestAuthority, tmp_path: Path
) -> None:
    web_endpoint.use_certificate(*web_certificate(web_ca, tmp_path, "elsewhere", host="elsewhere.test"))
    with pytest.raises(FetchError, match="not trusted: Hostname mismatch"):
        fetch(web_endpoint.url("localhost"), web_pki_context(_ca_file(web_ca, tmp_path)), timeout=2)


def test_https_web_with_the_system_roots_refuses_a_private_ca(web_endpoint: PartnerEndpoint) -> None:
    with pytest.raises(FetchError, match="not trusted"):
        fetch(web_endpoint.url("localhost"), web_pki_context(None), timeout=2)


def test_https_spiffe_ignores_host_names(tmp_path: Path, partner: TestAuthority) -> None:
    """§5.2.2: the SPIFFE ID is the identity; the certificate has no DNS or IP SAN at all here."""
    endpoint = PartnerEndpoint(*spiffe_endpoint_certificate(partner, tmp_path))
    endpoint.serve(bundle_document(partner))
    try:
        fetched = fetch(
            endpoint.url(),
            spiffe_context(partner.bundle().x509_authorities),
            check_peer=SpiffePeerCheck(SpiffeId.parse(ENDPOINT_ID)),
            timeout=2,
        )
    finally:
        endpoint.close()
    assert json.loads(fetched.body)["spiffe_sequence"] == partner.sequence
    assert fetched.chain[-1] == partner.ca_cert  # the verified chain ends at the partner's authority


def _ca_file(authority: TestAuthority, directory: Path) -> Path:
    path = directory / f"{authority.trust_domain}-ca.pem"
    path.write_bytes(authority.ca_pem())
    return path


# ---- hostile endpoints ---------------------------------------------------------------------------

HUGE = b'{"keys": [], "pad": "' + b"x" * (1024 * 1024 + 10) + b'"}'


def _other_domain_bundle(partner: TestAuthority) -> bytes:
    return bundle_document(TestAuthority("other.test"), sequence=partner.sequence + 5)


def _ca_without_spiffe_san_bundle(partner: TestAuthority) -> bytes:
    """Another party's CA that names no trust domain (nothing shows it is foreign), plus JWT keys."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "somebody else")])
    now = datetime.datetime.now(datetime.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    der = base64.b64encode(ca.public_bytes(serialization.Encoding.DER)).decode()
    entry = public_jwk(key.public_key()) | {"use": "x509-svid", "x5c": [der]}
    return bundle_document(partner, sequence=partner.sequence + 5, x509_ca=False, extra_keys=(entry,))


def _same_sequence_other_keys(partner: TestAuthority) -> bytes:
    other = TestAuthority("partner.test")
    other.ca_cert, other.ca_key = partner.ca_cert, partner.ca_key  # same CA, other JWT keys
    return bundle_document(other, sequence=partner.sequence)


def _private_key_bundle(partner: TestAuthority) -> bytes:
    document = json.loads(bundle_document(partner, sequence=partner.sequence + 1))
    document["keys"][0]["d"] = "c2VjcmV0"
    return json.dumps(document).encode()


def _kidless_bundle(partner: TestAuthority) -> bytes:
    document = json.loads(bundle_document(partner, sequence=partner.sequence + 1))
    del document["keys"][0]["kid"]
    return json.dumps(document).encode()


# name -> (what the endpoint answers, given the partner; a fragment of the logged reason)
CONTENT_CASES: dict[str, tuple[Callable[[TestAuthority], Answer], str]] = {
    "redirect-elsewhere": (
        lambda p: Answer(status=302, headers={"Location": "https://evil.test/bundle.json"}),
        "redirects are refused",
    ),
    "redirect-same-host": (
        lambda p: Answer(status=307, headers={"Location": "/other-bundle.json"}),
        "redirect (307",
    ),
    "http-500": (lambda p: Answer(b"oops", status=500), "HTTP 500"),
    "huge-head": (
        lambda p: Answer(bundle_document(p, sequence=p.sequence + 1), headers={"X-Pad": "x" * 20000}),
        "head is larger than 16384 bytes",
    ),
    "huge-head-incomplete": (
        lambda p: Answer(bundle_document(p, sequence=p.sequence + 1), headers={"X-Pad": "x" * 70000}),
        "not valid HTTP/1.1",
    ),
    "truncated-body": (
        lambda p: Answer(bundle_document(p, sequence=p.sequence + 1)[:-40], unframed=True),
        "not a JSON object",
    ),
    "huge-body": (lambda p: Answer(HUGE), "larger than 1048576 bytes"),
    "huge-body-chunked": (lambda p: Answer(HUGE, chunked=True), "larger than 1048576 bytes"),
    "slow-body": (
        lambda p: Answer(bundle_document(p, sequence=p.sequence + 1), trickle=0.02),
        "within 0.5 s",
    ),
    "slow-head": (lambda p: Answer(bundle_document(p, sequence=p.sequence + 1), delay=3), "within 0.5 s"),
    "invalid-json": (lambda p: Answer(b'{"keys": [,]}'), "not a JSON object"),
    "not-utf8": (lambda p: Answer(b'{"keys": [], "x": "\xff"}'), "not UTF-8"),
    "no-keys-member": (lambda p: Answer(b'{"spiffe_sequence": 99}'), "no 'keys' member"),
    "other-trust-domain": (lambda p: Answer(_other_domain_bundle(p)), "names trust domain 'other.test'"),
    "lower-sequence": (lambda p: Answer(bundle_document(p, sequence=p.sequence - 1)), "is older than"),
    "same-sequence-other-keys": (lambda p: Answer(_same_sequence_other_keys(p)), "with other keys"),
    "no-jwt-keys": (
        lambda p: Answer(bundle_document(p, sequence=p.sequence + 1, jwt=False)),
        "no JWT authorities",
    ),
    "empty-keys": (lambda p: Answer(b'{"keys": [], "spiffe_sequence": 999}'), "no JWT authorities"),
    "private-key": (lambda p: Answer(_private_key_bundle(p)), "private key material"),
    "jwt-key-without-kid": (lambda p: Answer(_kidless_bundle(p)), "has no 'kid'"),
}


@pytest.mark.parametrize("profile", ["https_spiffe", "https_web"])
@pytest.mark.parametrize("case", sorted(CONTENT_CASES))
def test_a_hostile_answer_keeps_the_last_good_bundle(
    case: str,
    profile: str,
    tmp_path: Path,
    partner: TestAuthority,
    web_ca: TestAuthority,
    clocks: Clocks,
    caplog: pytest.LogCaptureFixture,
) -> None:
    answer, reason = CONTENT_CASES[case]
    if profile == "https_spiffe":
        endpoint = PartnerEndpoint(*spiffe_endpoint_certificate(partner, tmp_path))
        source = spiffe_source(endpoint, partner, tmp_path, clocks, fetch_timeout=0.5)
    else:
        endpoint = PartnerEndpoint(*web_certificate(web_ca, tmp_path))
        source = web_source(endpoint, web_ca, tmp_path, clocks, fetch_timeout=0.5)
    try:
        endpoint.serve(bundle_document(partner))
        source.refresh()
        good = source.current()
        endpoint.answer = answer(partner)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="sts.bundle_endpoint"):
            delay = source.refresh()
        assert time.monotonic() - started < 2.5, "the fetch deadline cuts a slow endpoint"
        assert source.current() is good, "the last good bundle stays in use"
        last_error = source.describe()["last_error"]
        assert isinstance(last_error, str) and reason in last_error, last_error
        assert any(
            reason in r.getMessage() and "keeping the bundle" in r.getMessage() for r in caplog.records
        )
        assert delay == pytest.approx(0.05), "a failed poll is retried after the shortest interval"
        # None of it broke the source: the partner's next real bundle is taken.
        partner.rotate()
        endpoint.serve(bundle_document(partner))
        source.refresh()
        assert partner.kid in source.current().jwt_authorities
        assert source.describe()["last_error"] is None
    finally:
        endpoint.close()


def _spiffe_cert_cases(partner: TestAuthority, directory: Path) -> dict[str, tuple[Path, Path]]:
    return {
        "wrong-spiffe-id": spiffe_endpoint_certificate(
            partner, directory, "wrong-id", uris=("spiffe://partner.test/not-the-bundle-server",)
        ),
        "other-trust-domain-id": spiffe_endpoint_certificate(
            partner, directory, "other-td", uris=("spiffe://other.test/spire/server",)
        ),
        "two-uri-sans": spiffe_endpoint_certificate(
            partner, directory, "two", uris=(ENDPOINT_ID, "spiffe://partner.test/other")
        ),
        "wrong-ca": spiffe_endpoint_certificate(TestAuthority("partner.test"), directory, "wrong-ca"),
        "expired": spiffe_endpoint_certificate(partner, directory, "expired", lifetime=(-7200, -3600)),
        "not-yet-valid": spiffe_endpoint_certificate(partner, directory, "future", lifetime=(3600, 7200)),
        "ca-as-leaf": spiffe_endpoint_certificate(partner, directory, "ca-leaf", ca=True),
    }


SPIFFE_CERT_REASONS = {
    "wrong-spiffe-id": "presented spiffe://partner.test/not-the-bundle-server, not the configured",
    "other-trust-domain-id": "presented spiffe://other.test/spire/server",
    "two-uri-sans": "has 2 URI SANs",
    "wrong-ca": "not trusted",
    "expired": "certificate has expired",
    "not-yet-valid": "certificate is not yet valid",
    "ca-as-leaf": "CA certificate",
}


@pytest.mark.parametrize("case", sorted(SPIFFE_CERT_REASONS))
def test_https_spiffe_refuses_an_endpoint_that_is_not_the_configured_svid(
    case: str, tmp_path: Path, partner: TestAuthority, clocks: Clocks, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = PartnerEndpoint(*spiffe_endpoint_certificate(partner, tmp_path))
    try:
        endpoint.serve(bundle_document(partner))
        source = spiffe_source(endpoint, partner, tmp_path, clocks)
        source.refresh()
        good = source.current()
        endpoint.use_certificate(*_spiffe_cert_cases(partner, tmp_path)[case])
        partner.rotate()
        endpoint.serve(bundle_document(partner))  # a newer bundle, from the wrong server
        requests_before = len(endpoint.requests)
        with caplog.at_level(logging.WARNING, logger="sts.bundle_endpoint"):
            source.refresh()
        assert source.current() is good
        last_error = source.describe()["last_error"]
        assert isinstance(last_error, str) and SPIFFE_CERT_REASONS[case] in last_error, last_error
        assert any("fetch failed" in r.getMessage() for r in caplog.records)
        assert len(endpoint.requests) == requests_before, (
            "nothing is asked of a server that is not the endpoint"
        )
    finally:
        endpoint.close()


def test_https_spiffe_refuses_a_bundle_that_does_not_authenticate_its_own_endpoint(
    spiffe_endpoint: PartnerEndpoint, partner: TestAuthority, tmp_path: Path, clocks: Clocks
) -> None:
    """A CA with no SPIFFE SAN shows no trust domain; but it did not issue the endpoint's SVID."""
    source = spiffe_source(spiffe_endpoint, partner, tmp_path, clocks)
    source.refresh()
    good = source.current()
    spiffe_endpoint.serve(_ca_without_spiffe_san_bundle(partner))
    source.refresh()
    assert source.current() is good
    assert "authenticates the endpoint's own certificate" in str(source.describe()["last_error"])


def test_https_web_refuses_a_server_of_another_ca(
    web_endpoint: PartnerEndpoint,
    partner: TestAuthority,
    web_ca: TestAuthority,
    tmp_path: Path,
    clocks: Clocks,
) -> None:
    source = web_source(web_endpoint, web_ca, tmp_path, clocks)
    source.refresh()
    good = source.current()
    web_endpoint.use_certificate(*web_certificate(TestAuthority("webpki.test"), tmp_path, "impostor"))
    source.refresh()
    assert source.current() is good
    assert "not trusted" in str(source.describe()["last_error"])


def test_a_down_endpoint_keeps_the_last_good_bundle(
    spiffe_endpoint: PartnerEndpoint, partner: TestAuthority, tmp_path: Path, clocks: Clocks
) -> None:
    source = spiffe_source(spiffe_endpoint, partner, tmp_path, clocks)
    source.refresh()
    good = source.current()
    spiffe_endpoint.close()
    source.refresh()
    assert source.current() is good
    assert "cannot connect" in str(source.describe()["last_error"])


# ---- sequence, rotation, parsing -----------------------------------------------------------------


def test_rotation_with_a_higher_sequence_is_followed_and_an_equal_one_confirms(
    spiffe_endpoint: PartnerEndpoint, partner: TestAuthority, tmp_path: Path, clocks: Clocks
) -> None:
    source = spiffe_source(spiffe_endpoint, partner, tmp_path, clocks)
    source.refresh()
    first = source.current()
    clocks.advance(30)
    source.refresh()  # the same bundle again: confirmed, same objects (verification caches hold)
    assert source.current() is first
    assert source.describe()["age_seconds"] == 0
    old_kid = partner.kid
    partner.rotate()
    spiffe_endpoint.serve(bundle_document(partner))
    source.refresh()
    rotated = source.current()
    assert rotated is not first
    assert set(rotated.jwt_authorities) == {old_kid, partner.kid}
    assert rotated.sequence == first.sequence + 1  # type: ignore[operator]


def test_a_bundle_without_sequence_is_taken_as_the_newest(
    spiffe_endpoint: PartnerEndpoint, partner: TestAuthority, tmp_path: Path, clocks: Clocks
) -> None:
    document = json.loads(bundle_document(partner))
    del document["spiffe_sequence"]
    spiffe_endpoint.serve(json.dumps(document).encode())
    source = spiffe_source(spiffe_endpoint, partner, tmp_path, clocks)
    source.refresh()
    assert source.current().sequence is None
    partner.rotate()
    document = json.loads(bundle_document(partner))
    del document["spiffe_sequence"]
    spiffe_endpoint.serve(json.dumps(document).encode())
    source.refresh()
    assert partner.kid in source.current().jwt_authorities


def test_endpoint_bundles_are_parsed_by_the_bundle_file_parser(
    spiffe_endpoint: PartnerEndpoint, partner: TestAuthority, tmp_path: Path, clocks: Clocks
) -> None:
    """X509-SVID §6.2: an x509-svid entry without x5c, or with an empty one, is ignored; of several
    x5c values only the first counts; unknown kty and use are ignored (Bundle §4.2)."""
    other = TestAuthority("partner.test")
    other_der = base64.b64encode(other.ca_cert.public_bytes(serialization.Encoding.DER)).decode()
    ca_der = base64.b64encode(partner.ca_cert.public_bytes(serialization.Encoding.DER)).decode()
    extra = (
        public_jwk(other.ca_key.public_key()) | {"use": "x509-svid"},
        public_jwk(other.ca_key.public_key()) | {"use": "x509-svid", "x5c": []},
        {"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "use": "jwt-svid", "kid": "okp"},
        public_jwk(partner.public_key) | {"use": "something-else", "kid": "x"},
    )
    document = json.loads(bundle_document(partner, x509_ca=False, extra_keys=extra))
    document["keys"].append(
        public_jwk(partner.ca_key.public_key()) | {"use": "x509-svid", "x5c": [ca_der, other_der]}
    )
    body = json.dumps(document).encode()
    spiffe_endpoint.serve(body)
    source = spiffe_source(spiffe_endpoint, partner, tmp_path, clocks)
    source.refresh()
    fetched = source.current()
    (tmp_path / "same.json").write_bytes(body)
    from_file = FileBundleSource(PARTNER, tmp_path / "same.json").current()
    assert fetched.x509_authorities == from_file.x509_authorities == (partner.ca_cert,)
    assert set(fetched.jwt_authorities) == set(from_file.jwt_authorities) == {partner.kid}


# ---- staleness and persistence -------------------------------------------------------------------


def test_the_last_good_bundle_serves_for_max_staleness_then_the_domain_is_unavailable(
    spiffe_endpoint: PartnerEndpoint, partner: TestAuthority, tmp_path: Path, clocks: Clocks
) -> None:
    source = spiffe_source(spiffe_endpoint, partner, tmp_path, clocks, max_staleness=60.0)
    source.refresh()
    spiffe_endpoint.serve(b"garbage")
    clocks.advance(59)
    source.refresh()
    assert source.current().jwt_authorities
    clocks.advance(2)
    with pytest.raises(TemporarilyUnavailable, match="is stale") as refused:
        source.current()
    assert refused.value.status == 503 and refused.value.error == "temporarily_unavailable"
    problems = TrustStore([source]).readiness()
    assert len(problems) == 1
    assert problems[0].startswith(
        "trust bundle for partner.test is unavailable: the trust bundle of partner.test"
    )
    assert "last error: " in problems[0] and "not a JSON object" in problems[0]
    spiffe_endpoint.serve(bundle_document(partner))
    source.refresh()
    assert source.current().jwt_authorities  # fresh again: the endpoint answered


def test_the_last_good_bundle_is_persisted_atomically_and_privately(
    spiffe_endpoint: PartnerEndpoint, partner: TestAuthority, tmp_path: Path, clocks: Clocks
) -> None:
    cache = tmp_path / "state" / "bundles" / "partner.test.json"
    source = spiffe_source(spiffe_endpoint, partner, tmp_path, clocks, cache_file=cache)
    source.refresh()
    assert cache.stat().st_mode & 0o777 == 0o600
    assert cache.parent.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in cache.parent.iterdir()] == [cache.name], "no temporary file left behind"
    loaded = read_cache(cache, PARTNER, source.url)
    assert loaded is not None
    bundle, raw, fetched_at = loaded
    assert raw == bundle_document(partner) and fetched_at == pytest.approx(clocks.wall, abs=0.01)
    assert set(bundle.jwt_authorities) == {partner.kid}
    assert read_cache(cache, PARTNER, "https://elsewhere.test/bundle") is None  # another endpoint's
    assert read_cache(cache, TrustDomain("other.test"), source.url) is None


def test_a_restart_while_the_endpoint_is_down_serves_the_persisted_bundle_until_max_staleness(
    spiffe_endpoint: PartnerEndpoint, partner: TestAuthority, tmp_path: Path, clocks: Clocks
) -> None:
    first = spiffe_source(spiffe_endpoint, partner, tmp_path, clocks, max_staleness=100.0)
    first.refresh()
    clocks.advance(40)
    spiffe_endpoint.close()  # the partner is down, and we restart
    restarted_clocks = Clocks()
    restarted_clocks.wall = clocks.wall  # a new process: another monotonic origin, the same wall clock
    restarted = spiffe_source(spiffe_endpoint, partner, tmp_path, restarted_clocks, max_staleness=100.0)
    assert set(restarted.current().jwt_authorities) == {partner.kid}
    described = restarted.describe()
    assert described["from_cache"] is True and described["age_seconds"] == 40
    restarted.refresh()  # the endpoint is down: the persisted bundle keeps serving
    assert restarted.current().jwt_authorities
    restarted_clocks.advance(59)
    assert restarted.servable()
    restarted_clocks.advance(2)  # 101 s after it was fetched
    with pytest.raises(TemporarilyUnavailable, match="is stale"):
        restarted.current()


@pytest.mark.parametrize("damage", ["garbage", "writable-by-others", "future", "other-format"])
def test_an_unusable_persisted_bundle_is_ignored(
    damage: str,
    spiffe_endpoint: PartnerEndpoint,
    partner: TestAuthority,
    tmp_path: Path,
    clocks: Clocks,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = tmp_path / "state" / "bundles" / "partner.test.json"
    spiffe_source(spiffe_endpoint, partner, tmp_path, clocks, cache_file=cache).refresh()
    document = json.loads(cache.read_text())
    if damage == "garbage":
        cache.write_text("{not json")
    elif damage == "writable-by-others":
        cache.chmod(0o666)
    elif damage == "future":
        document["fetched_at"] = clocks.wall + 3600
        cache.write_text(json.dumps(document))
    else:
        document["format"] = "something/2"
        cache.write_text(json.dumps(document))
    with caplog.at_level(logging.WARNING, logger="sts.bundle_endpoint"):
        source = spiffe_source(spiffe_endpoint, partner, tmp_path, clocks, cache_file=cache)
    assert not source.servable()
    assert any("ignoring the persisted bundle" in r.getMessage() for r in caplog.records)


def test_an_unwritable_cache_is_reported_but_the_bundle_serves(
    spiffe_endpoint: PartnerEndpoint, partner: TestAuthority, tmp_path: Path, clocks: Clocks
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    source = spiffe_source(
        spiffe_endpoint, partner, tmp_path, clocks, cache_file=blocker / "partner.test.json"
    )
    source.refresh()
    assert source.current().jwt_authorities
    assert "cannot write" in str(source.describe()["cache_error"])
    assert source.persist_problem is not None


# ---- the poll interval ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hint", "max_staleness", "expected"),
    [
        (1, 3600.0, 5.0),  # never more often than every 5 s
        (60, 3600.0, 60.0),  # the hint
        (None, 3600.0, 300.0),  # no hint: five minutes (Federation §4.1)
        (0, 3600.0, 300.0),
        (86400, 100000.0, 3600.0),  # never less often than hourly
        (600, 300.0, 100.0),  # a third of max_staleness: two failed polls still leave a fresh bundle
    ],
)
def test_the_refresh_hint_is_honoured_within_bounds(
    hint: int | None,
    max_staleness: float,
    expected: float,
    spiffe_endpoint: PartnerEndpoint,
    partner: TestAuthority,
    tmp_path: Path,
    clocks: Clocks,
) -> None:
    spiffe_endpoint.serve(bundle_document(partner, hint=hint))
    source = spiffe_source(
        spiffe_endpoint, partner, tmp_path, clocks, min_refresh=5.0, max_staleness=max_staleness
    )
    assert source.refresh() == expected


def test_failed_polls_back_off_up_to_the_interval(
    spiffe_endpoint: PartnerEndpoint, partner: TestAuthority, tmp_path: Path, clocks: Clocks
) -> None:
    spiffe_endpoint.serve(bundle_document(partner, hint=60))
    source = spiffe_source(spiffe_endpoint, partner, tmp_path, clocks, min_refresh=5.0, max_staleness=3600.0)
    source.refresh()
    spiffe_endpoint.serve(b"", status=503)
    assert [source.refresh() for _ in range(6)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]


# ---- the background poller -----------------------------------------------------------------------


def _eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the deadline"
        time.sleep(0.02)


def test_the_poller_follows_rotation_survives_garbage_and_stops(
    spiffe_endpoint: PartnerEndpoint, partner: TestAuthority, tmp_path: Path
) -> None:
    source = BundleEndpointSource(
        PARTNER,
        spiffe_endpoint.url(),
        profile="https_spiffe",
        spiffe_id=SpiffeId.parse(ENDPOINT_ID),
        bootstrap=partner.bundle(),
        max_staleness=30.0,
        min_refresh=0.05,
        max_refresh=0.1,
        fetch_timeout=1.0,
        cache_file=tmp_path / "cache.json",
    )
    source.start()
    try:
        assert source.wait_first_attempt(5)
        _eventually(source.servable)
        first_kid = partner.kid
        spiffe_endpoint.serve(b"<html>maintenance</html>")
        _eventually(lambda: source.describe()["last_error"] is not None)
        assert first_kid in source.current().jwt_authorities
        partner.rotate()
        spiffe_endpoint.serve(bundle_document(partner))
        _eventually(lambda: partner.kid in source.current().jwt_authorities)
        assert source.describe()["last_error"] is None
    finally:
        source.stop()
    assert source._thread is not None and not source._thread.is_alive()


def test_a_dropped_source_ends_its_thread(
    spiffe_endpoint: PartnerEndpoint, partner: TestAuthority, tmp_path: Path
) -> None:
    import gc

    source = BundleEndpointSource(
        PARTNER,
        spiffe_endpoint.url(),
        profile="https_spiffe",
        spiffe_id=SpiffeId.parse(ENDPOINT_ID),
        bootstrap=partner.bundle(),
        max_staleness=30.0,
        min_refresh=0.05,
        max_refresh=0.05,
    )
    source.start()
    thread = source._thread
    assert thread is not None and source.wait_first_attempt(5)
    del source
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_trust_store_close_stops_the_pollers(
    spiffe_endpoint: PartnerEndpoint, partner: TestAuthority, tmp_path: Path, clocks: Clocks
) -> None:
    source = spiffe_source(spiffe_endpoint, partner, tmp_path, clocks)
    source.start()
    assert source.wait_first_attempt(5)
    TrustStore([source]).close()
    assert source._thread is not None and not source._thread.is_alive()


# ---- configuration -------------------------------------------------------------------------------


def _config(tmp_path: Path, entry: str, extra: str = "") -> Path:
    config = tmp_path / "sts.yaml"
    config.write_text(f"trust_domains:\n  partner.test: {entry}\n{extra}")
    return config


def test_the_settings_of_both_profiles(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        "{bundle_endpoint: 'https://bundles.partner.test:8443/bundle', endpoint_profile: https_spiffe, "
        "endpoint_spiffe_id: 'spiffe://partner.test/spire/server', bootstrap_bundle_file: b/partner.json, "
        "max_staleness: 10m, cache_file: /var/lib/sts/partner.json}",
    )
    (entry,) = load_settings(config, environ={}).trust_domains
    assert entry.bundle_endpoint == "https://bundles.partner.test:8443/bundle"
    assert entry.endpoint_profile == "https_spiffe"
    assert entry.endpoint_spiffe_id == SpiffeId.parse(ENDPOINT_ID)
    assert entry.bootstrap_bundle_file == tmp_path / "b/partner.json"
    assert entry.max_staleness == 600
    assert entry.cache_file == Path("/var/lib/sts/partner.json")
    config = _config(
        tmp_path,
        "{bundle_endpoint: 'https://partner.test/b', endpoint_profile: https_web, endpoint_ca_file: ca.pem}",
    )
    (entry,) = load_settings(config, environ={}).trust_domains
    assert (entry.endpoint_profile, entry.endpoint_ca_file) == ("https_web", tmp_path / "ca.pem")
    assert entry.max_staleness is None and entry.cache_file is None  # the runtime's defaults


WEB = "bundle_endpoint: 'https://partner.test/b', endpoint_profile: https_web"
SPIFFE = (
    "bundle_endpoint: 'https://partner.test/b', endpoint_profile: https_spiffe, "
    "endpoint_spiffe_id: 'spiffe://partner.test/spire/server', bootstrap_bundle_file: b.json"
)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            "{bundle_endpoint: 'https://partner.test/b'}",
            "line 2: 'trust_domains.partner.test' needs endpoint_profile",
        ),
        (
            "{bundle_endpoint: 'https://partner.test/b', endpoint_profile: https}",
            "line 2: 'trust_domains.partner.test.endpoint_profile' must be https_web or https_spiffe",
        ),
        ("{bundle_endpoint: 'http://partner.test/b', endpoint_profile: https_web}", "must be an https URL"),
        ("{bundle_endpoint: 'https://u:p@partner.test/b', endpoint_profile: https_web}", "without userinfo"),
        ("{bundle_endpoint: 'https://partner.test/b#x', endpoint_profile: https_web}", "or fragment"),
        ("{bundle_endpoint: 'https:///b', endpoint_profile: https_web}", "with a host"),
        (
            "{bundle_endpoint: 'https://partner.test/b', endpoint_profile: https_spiffe, bootstrap_bundle_file: b.json}",
            "'trust_domains.partner.test' needs endpoint_spiffe_id",
        ),
        (
            "{bundle_endpoint: 'https://partner.test/b', endpoint_profile: https_spiffe, endpoint_spiffe_id: 'spiffe://partner.test/s'}",
            "'trust_domains.partner.test' needs bootstrap_bundle_file",
        ),
        (
            "{" + SPIFFE.replace("spiffe://partner.test/spire/server", "spiffe://example.org/bundles") + "}",
            "'trust_domains.partner.test.endpoint_spiffe_id' must be in trust domain partner.test",
        ),
        (
            "{" + SPIFFE.replace("spiffe://partner.test/spire/server", "spiffe://partner.test") + "}",
            "must name a workload",
        ),
        (
            "{" + SPIFFE.replace("spiffe://partner.test/spire/server", "partner.test/x") + "}",
            "is not a SPIFFE ID",
        ),
        (
            "{" + SPIFFE + ", endpoint_ca_file: ca.pem}",
            "'trust_domains.partner.test.endpoint_ca_file' applies only with endpoint_profile: https_web",
        ),
        (
            "{" + WEB + ", endpoint_spiffe_id: 'spiffe://partner.test/s'}",
            "applies only with endpoint_profile: https_spiffe",
        ),
        ("{" + WEB + ", bootstrap_bundle_file: b.json}", "applies only with endpoint_profile: https_spiffe"),
        (
            "{" + WEB + ", max_staleness: 10s}",
            "'trust_domains.partner.test.max_staleness' must be at least 15s",
        ),
        ("{" + WEB + ", max_staleness: soon}", "must be a positive duration"),
        (
            "{bundle_file: b.json, endpoint_profile: https_web}",
            "'trust_domains.partner.test.endpoint_profile' applies only with bundle_endpoint",
        ),
        ("{bundle_file: b.json, max_staleness: 1h}", "applies only with bundle_endpoint"),
        ("{bundle_file: b.json, cache_file: c.json}", "applies only with bundle_endpoint"),
        (
            "{" + WEB + ", endpoint_cafile: ca.pem}",
            "is not a known setting (did you mean 'endpoint_ca_file'?)",
        ),
    ],
)
def test_bad_endpoint_settings_name_the_key_and_line(tmp_path: Path, entry: str, message: str) -> None:
    with pytest.raises(
        ConfigError, match="^" + str(tmp_path / "sts.yaml").replace(".", r"\.") + ", line 2: "
    ) as refused:
        load_settings(_config(tmp_path, entry), environ={})
    assert message in str(refused.value)


def _settings_for(tmp_path: Path, entry: str, extra: str = "") -> Any:
    return load_settings(
        _config(tmp_path, entry, f"keys: {{dir: {tmp_path / 'state' / 'keys'}}}\n{extra}"), environ={}
    )


def test_the_runtime_defaults_max_staleness_and_the_cache_file(
    tmp_path: Path, spiffe_endpoint: PartnerEndpoint, partner: TestAuthority
) -> None:
    partner.write_bundle(tmp_path / "b.json")
    settings = _settings_for(
        tmp_path,
        "{" + SPIFFE.replace("https://partner.test/b", spiffe_endpoint.url()) + "}",
        "workload_api: {max_staleness: 2m}\n",
    )
    (entry,) = settings.trust_domains
    source = source_from_settings(entry, default_max_staleness=120, keys_dir=settings.keys.dir)
    assert source.max_staleness == 120
    assert source.cache_file == tmp_path / "state" / "bundles" / "partner.test.json"
    store, watcher = build_trust_store(settings, connect=False)
    assert watcher is None and store.trust_domains == frozenset({PARTNER})
    assert spiffe_endpoint.requests == [], "connect=False never polls (the parent of the workers)"
    with pytest.raises(
        ConfigError, match=r"trust_domains\.partner\.test\.max_staleness: defaults to workload_api"
    ):
        build_trust_store(
            _settings_for(tmp_path, "{" + SPIFFE + "}", "workload_api: {max_staleness: 10s}\n"), connect=False
        )


def test_build_trust_store_connect_waits_for_the_first_poll(
    tmp_path: Path, spiffe_endpoint: PartnerEndpoint, partner: TestAuthority
) -> None:
    partner.write_bundle(tmp_path / "b.json")
    settings = _settings_for(
        tmp_path, "{" + SPIFFE.replace("https://partner.test/b", spiffe_endpoint.url()) + "}"
    )
    store, _ = build_trust_store(settings, connect=True)
    try:
        bundle = store.bundle_for(PARTNER)
        assert bundle is not None and partner.kid in bundle.jwt_authorities
        assert store.describe(PARTNER)["source"] == "bundle_endpoint"
    finally:
        store.close()


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        ("missing", "bootstrap_bundle_file: cannot read bundle file"),
        ("garbage", "bootstrap_bundle_file: bundle file"),
        ("jwt-only", "has no X.509 authority, so it cannot authenticate the https_spiffe endpoint"),
        ("foreign", "names trust domain 'other.test'"),
    ],
)
def test_a_bad_bootstrap_bundle_stops_start_up(
    tmp_path: Path, partner: TestAuthority, prepare: str, message: str
) -> None:
    path = tmp_path / "b.json"
    if prepare == "garbage":
        path.write_text("{nope")
    elif prepare == "jwt-only":
        path.write_bytes(bundle_document(partner, x509_ca=False))
    elif prepare == "foreign":
        TestAuthority("other.test").write_bundle(path)
    with pytest.raises(ConfigError, match=r"^trust_domains\.partner\.test\.") as refused:
        build_trust_store(_settings_for(tmp_path, "{" + SPIFFE + "}"), connect=False)
    assert message in str(refused.value)


def test_a_pem_bootstrap_bundle_is_enough(tmp_path: Path, partner: TestAuthority) -> None:
    (tmp_path / "b.json").write_bytes(partner.ca_pem())  # PEM CA certificates, like bundle_file
    store, _ = build_trust_store(_settings_for(tmp_path, "{" + SPIFFE + "}"), connect=False)
    assert store.trust_domains == frozenset({PARTNER})


def test_a_bad_endpoint_ca_file_stops_start_up(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"^trust_domains\.partner\.test\.endpoint_ca_file: cannot load"):
        build_trust_store(_settings_for(tmp_path, "{" + WEB + ", endpoint_ca_file: ca.pem}"), connect=False)


def test_a_spiffe_ca_of_another_domain_in_the_bootstrap_is_detected(partner: TestAuthority) -> None:
    from sts.bundle_endpoint import foreign_trust_domains

    key = ec.generate_private_key(ec.SECP256R1())
    other = spiffe_ca_certificate(TrustDomain("other.test"), key)
    assert foreign_trust_domains(partner.bundle()) == set()
    mixed = type(partner.bundle())(PARTNER, x509_authorities=(partner.ca_cert, other))
    assert foreign_trust_domains(mixed) == {"other.test"}


def test_readiness_shows_where_each_trust_domain_stands(
    tmp_path: Path, spiffe_endpoint: PartnerEndpoint, partner: TestAuthority, example_org: TestAuthority
) -> None:
    """Services.readiness: per trust domain its source, sequence, last refresh and age; a bundle that
    cannot be persisted is a warning, not a problem."""
    from sts.runtime import build_services

    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.cedar").write_text('@id("p") permit(principal, action, resource);\n')
    partner.write_bundle(tmp_path / "b.json")
    example_org.write_bundle(tmp_path / "example.json")
    (tmp_path / "blocker").write_text("")
    entry = (
        "{"
        + SPIFFE.replace("https://partner.test/b", spiffe_endpoint.url())
        + ", cache_file: blocker/p.json}"
    )
    config = tmp_path / "sts.yaml"
    config.write_text(
        f"trust_domains:\n  partner.test: {entry}\n  example.org: {{bundle_file: example.json}}\n"
        f"keys: {{dir: {tmp_path / 'keys'}}}\nstore: {{url: 'memory://'}}\npolicy: {{dir: policies}}\n"
        "catalog:\n  - {id: tool:calc, class: tool, scopes: [invoke]}\n"
    )
    services = build_services(load_settings(config, environ={}))
    try:
        readiness = services.readiness()
    finally:
        services.trust.close()
        services.close()
    assert readiness.problems == []
    (warning,) = readiness.warnings
    assert warning.startswith(
        "trust domain partner.test: the last good bundle is not persisted (cannot write"
    )
    endpoint = readiness.trust_domains["partner.test"]
    assert endpoint["source"] == "bundle_endpoint" and endpoint["available"] is True
    assert endpoint["sequence"] == partner.sequence and endpoint["jwt_authorities"] == 1
    assert isinstance(endpoint["last_refresh"], float) and endpoint["age_seconds"] == pytest.approx(0, abs=5)
    assert endpoint["endpoint"] == spiffe_endpoint.url()
    file = readiness.trust_domains["example.org"]
    assert file["source"] == "file" and file["path"] == str(tmp_path / "example.json")
    assert file["sequence"] == example_org.sequence and isinstance(file["last_refresh"], float)
