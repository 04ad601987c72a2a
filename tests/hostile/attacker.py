"""The attacker's toolbox: raw JOSE forging, plain HTTP and raw sockets, X.509 certificates, and the checks.

Nothing here uses the project's client code: requests go out with ``requests``, ``socket`` and
``ssl`` as any hostile client would send them. Tokens are built byte by byte (so a payload can hold
``NaN`` or a 400-digit integer) and signed with keys the test authorities hold.

Every check (:func:`refused`, :func:`inactive`, :func:`raises`, :func:`raw_refused`) reports to
:mod:`tests.hostile.tally` before it asserts, so the session summary counts wrongly accepted
requests, 5xx answers and hangs even when the assertion then fails.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from jwt.algorithms import get_default_algorithms

from sts.errors import StsError
from sts.spiffeid import TrustDomain
from tests.authority import spiffe_ca_certificate
from tests.hostile import tally

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"

AGENT = "spiffe://example.org/agent/researcher"
OTHER_AGENT = "spiffe://example.org/agent/other"
ORCHESTRATOR = "spiffe://example.org/orchestrator"
CALC = "spiffe://example.org/tool/calc"
SEARCH = "spiffe://example.org/tool/web-search"
CRM = "spiffe://example.org/data/crm"
ADMIN = "spiffe://example.org/ops/sts-admin"
PARTNER_AGENT = "spiffe://partner.test/agent/summarizer"
RSA_AGENT = "spiffe://rsa.test/agent/r"

TIMEOUT = 10.0
RAW_TIMEOUT = 4.0
_ALGORITHMS = get_default_algorithms()


# --- JOSE, byte by byte ---------------------------------------------------------------------------


def b64(data: bytes | str) -> str:
    """base64url without padding (RFC 7515 §2)."""
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def part(value: Mapping[str, Any] | str | bytes) -> str:
    """One JOSE part: a mapping is dumped compactly; text or bytes are taken as the exact JSON."""
    if isinstance(value, Mapping):
        return b64(json.dumps(dict(value), separators=(",", ":")))
    return b64(value)


def sign(alg: str, key: Any, signing_input: bytes) -> bytes:
    """``alg``'s signature over ``signing_input`` (PyJWT's algorithms; HS* take raw secret bytes)."""
    if alg.startswith("HS"):
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
        return hmac.new(key, signing_input, digest).digest()
    return _ALGORITHMS[alg].sign(signing_input, key)  # type: ignore[no-any-return]


def jws(
    header: Mapping[str, Any] | str | bytes,
    payload: Mapping[str, Any] | str | bytes,
    key: Any,
    alg: str,
) -> str:
    """A compact JWS of exactly this header and payload, signed with ``key`` under ``alg``."""
    signing_input = f"{part(header)}.{part(payload)}"
    return f"{signing_input}.{b64(sign(alg, key, signing_input.encode('ascii')))}"


def unsigned(header: Mapping[str, Any] | str, payload: Mapping[str, Any] | str, signature: bytes = b"") -> str:
    return f"{part(header)}.{part(payload)}.{b64(signature)}"


def pem(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def der(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def now() -> int:
    return int(time.time())


# --- plain HTTP -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What came back: ``status`` None means no HTTP answer (connection closed or TLS refused)."""

    status: int | None
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    text: str = ""

    @property
    def error(self) -> str | None:
        return self.body.get("error") if isinstance(self.body, dict) else None

    @classmethod
    def of(cls, response: requests.Response) -> Answer:
        try:
            body = response.json()
        except ValueError:
            body = None
        return cls(response.status_code, body, response.headers, response.text[:2000])


Form = Mapping[str, str | Sequence[str]] | Sequence[tuple[str, str]] | bytes | str


def http(
    method: str,
    url: str,
    *,
    data: Form | None = None,
    json_body: Any = None,
    headers: Mapping[str, str] | None = None,
    cert: tuple[Path, Path] | None = None,
    verify: str | bool = True,
    session: requests.Session | None = None,
) -> Answer:
    """One request; a refused TLS handshake or a dropped connection is ``Answer(None)``."""
    sender = session or requests
    try:
        response = sender.request(
            method,
            url,
            data=data,
            json=json_body,
            headers=dict(headers or {}),
            cert=(str(cert[0]), str(cert[1])) if cert else None,
            verify=verify,
            timeout=TIMEOUT,
        )
    except requests.exceptions.ConnectionError as e:
        return Answer(None, text=f"connection refused or closed: {e!r}"[:500])
    return Answer.of(response)


def form(subject_token: str | None, **extra: str | Sequence[str]) -> dict[str, str | Sequence[str]]:
    """A token-exchange form body; ``None`` values are dropped, lists repeat the parameter."""
    body: dict[str, str | Sequence[str]] = {"grant_type": GRANT, "subject_token_type": JWT_TYPE}
    if subject_token is not None:
        body["subject_token"] = subject_token
    body |= extra
    return {k: v for k, v in body.items() if v is not None}


# --- the checks -----------------------------------------------------------------------------------


def refused(answer: Answer, status: int, error: str | None) -> None:
    """The exact refusal: this HTTP status and this OAuth ``error`` code, and nothing issued."""
    tally.note(
        accepted=answer.status is not None and 200 <= answer.status < 300,
        server_error=answer.status is not None and answer.status >= 500,
    )
    assert (answer.status, answer.error) == (status, error), answer.text[:600]
    if isinstance(answer.body, dict):
        assert "access_token" not in answer.body


def closed(answer: Answer) -> None:
    """Refused in the TLS handshake (or the connection dropped): no HTTP answer at all."""
    tally.note(
        accepted=answer.status is not None and answer.status < 300,
        server_error=answer.status is not None and answer.status >= 500,
    )
    assert answer.status is None, answer.text[:600]


def inactive(answer: Answer) -> None:
    """RFC 7662 §2.2: the refusal of introspection is ``200 {"active": false}`` and nothing more."""
    accepted = isinstance(answer.body, dict) and answer.body.get("active") is True
    tally.note(accepted=accepted, server_error=answer.status is not None and answer.status >= 500)
    assert (answer.status, answer.body) == (200, {"active": False}), answer.text[:600]


def raises(call: Callable[[], Any], status: int, error: str) -> None:
    """A library call (the resource server's verifier) must refuse with this protocol error.

    Returning counts as accepted; an exception outside the error tree counts as a 5xx, because a
    resource server using ``require_token`` answers it with 500.
    """
    refusal: StsError | None = None
    try:
        call()
    except StsError as e:
        refusal = e
    except Exception as e:
        tally.note(server_error=True)
        raise AssertionError(f"raw exception instead of a refusal: {type(e).__name__}: {e}") from e
    if refusal is None:
        tally.note(accepted=True)
        raise AssertionError("accepted")
    tally.note(server_error=refusal.status >= 500)
    got = (refusal.status, refusal.error)
    assert got == (status, error), f"{type(refusal).__name__}: {refusal.description}"


# --- raw sockets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawAnswer:
    """``closed`` (EOF, reset, TLS alert or handshake refused), ``hung`` (no answer in time), or a status."""

    kind: str
    status: int | None = None
    head: bytes = b""


def raw(
    port: int,
    chunks: Iterable[bytes],
    *,
    context: ssl.SSLContext | None = None,
    timeout: float = RAW_TIMEOUT,
) -> RawAnswer:
    """Send ``chunks`` on a fresh connection (TLS when ``context``) and read the first answer."""
    deadline = time.monotonic() + timeout
    try:
        sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as e:
        return RawAnswer("closed", head=repr(e).encode())
    try:
        if context is not None:
            try:
                sock = context.wrap_socket(sock, server_hostname="localhost")
            except (ssl.SSLError, OSError) as e:
                return RawAnswer("hung" if isinstance(e, TimeoutError) else "closed", head=repr(e).encode())
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the server may have answered and closed already: read what it said
        except TimeoutError:
            return RawAnswer("hung")
        received = b""
        while b"\r\n" not in received:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data = sock.recv(65536)
            except TimeoutError:
                return RawAnswer("hung", head=received[:200])
            except (ConnectionResetError, ssl.SSLError, OSError):
                break
            if not data:
                break
            received += data
        return _parse_head(received)
    finally:
        sock.close()


def _parse_head(received: bytes) -> RawAnswer:
    line = received.split(b"\r\n", 1)[0]
    words = line.split(b" ")
    if len(words) >= 2 and words[0].startswith(b"HTTP/") and words[1].isdigit():
        return RawAnswer("status", int(words[1]), received[:300])
    return RawAnswer("closed", head=received[:200])


def raw_refused(answer: RawAnswer) -> None:
    """Malformed HTTP: a 4xx or a closed connection; never a 5xx, never a hang, never success."""
    status = answer.status or 0
    tally.note(
        accepted=answer.kind == "status" and status < 400,
        server_error=status >= 500,
        hung=answer.kind == "hung",
    )
    assert answer.kind == "closed" or (answer.kind == "status" and 400 <= status < 500), (
        answer.kind,
        answer.status,
        answer.head,
    )


# --- X.509 ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ca:
    """An X.509 CA the attacker (or a trust domain) holds."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def write_pair(
    directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def issue(
    ca: Ca,
    directory: Path,
    name: str,
    *,
    uris: Sequence[str] = (AGENT,),
    dns: Sequence[str] = (),
    is_ca: bool = False,
    lifetime: tuple[int, int] = (-60, 3600),
    cert_sign: bool = False,
) -> tuple[Path, Path, x509.Certificate]:
    """A certificate signed by ``ca``, shaped as asked (SANs, CA flag, validity window), as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.DNSName(d) for d in dns]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start + datetime.timedelta(seconds=lifetime[0]))
        .not_valid_after(start + datetime.timedelta(seconds=lifetime[1]))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca or cert_sign,
                crl_sign=is_ca or cert_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=not dns)
    certificate = builder.sign(ca.key, hashes.SHA256())
    cert_path, key_path = write_pair(directory, name, certificate, key)
    return cert_path, key_path, certificate


def self_signed_ca(name: str) -> Ca:
    """A CA no trust domain of the server knows (shaped as the test authority's own CAs)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return Ca(key, spiffe_ca_certificate(TrustDomain.parse(name), key))
