"""The verifier library's errors say why (issue 12 #10): every refusal names its rule, nothing more.

In process, against a fake STS (RFC 8414 metadata and a JWKS with one tool and one data key): for
each rule of ``sts.verify.RULES`` a token (and proof, certificate) that fails exactly that rule, and
the rule must appear in ``str(error)``, in the challenge's ``error_description`` (RFC 6750 §3.1, over
Flask too) and in the log line of the verifier, while the challenge names no expected value
(issuer, audience, class) and nothing the caller sent. Then the Workload API: a verifier that
introspects fails at construction when its socket is missing or dead, quickly, naming the socket.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from flask import Flask
from jwt.algorithms import ECAlgorithm

import sts.verify
from sts.binding import DpopKey, b64url, certificate_thumbprint
from sts.errors import ConfigError
from sts.strict_json import b64url_decode
from sts.verify import (
    NOT_OURS,
    RULES,
    DpopProofRefused,
    InsufficientScope,
    InvalidAccessToken,
    MissingToken,
    TokenVerifier,
    WorkloadApiUnavailable,
)

ISSUER = "https://sts.errors.example"
AUDIENCE = "tool:errors-calc"
OTHER_AUDIENCE = "tool:somewhere-else"
OTHER_ISSUER = "https://evil.example"
URL = "https://calc.example/invoke"
TOOL_KEY = ec.generate_private_key(ec.SECP256R1())
TOOL_KID = "tool-errors-1"
DATA_KEY = ec.generate_private_key(ec.SECP256R1())
DATA_KID = "data-errors-1"
HOLDER = DpopKey.generate()
# RFC 6750 §3: a scheme, then name="value" pairs whose values are %x20-21 / %x23-5B / %x5D-7E.
_VALUE = r'"[\x20\x21\x23-\x5b\x5d-\x7e]*"'
CHALLENGE = re.compile(rf"^(Bearer|DPoP)( [a-z_]+={_VALUE}(, [a-z_]+={_VALUE})*)?$")


class FakeSts(requests.Session):
    """The STS as a resource server sees it: RFC 8414 metadata and one JWKS with both classes' keys."""

    def get(self, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if str(url).endswith("/.well-known/oauth-authorization-server"):
            return _response({"issuer": ISSUER, "jwks_uri": f"{ISSUER}/jwks.json"})
        keys = [
            ECAlgorithm.to_jwk(key.public_key(), as_dict=True) | {"kid": kid, "use": "sig"}
            for key, kid in ((TOOL_KEY, TOOL_KID), (DATA_KEY, DATA_KID))
        ]
        return _response({"keys": keys})


def _response(body: Mapping[str, Any]) -> requests.Response:
    response = requests.Response()
    response.status_code = 200
    response._content = json.dumps(body).encode()
    return response


@dataclass
class Revocations:
    """A revocation check (``sts.verify.RevocationCheck``) answering from a set of revoked ``jti``."""

    revoked: set[str] = field(default_factory=set)

    def active(self, token: str, claims: Mapping[str, Any], now: float) -> bool:
        return claims["jti"] not in self.revoked


REVOKED_JTI = "at-revoked"


def make_verifier() -> TokenVerifier:
    return TokenVerifier(
        issuer=ISSUER,
        audience=AUDIENCE,
        token_class="tool",
        revocation=Revocations({REVOKED_JTI}),
        session=FakeSts(),
    )


def sign(header: Mapping[str, Any], payload: str, key: ec.EllipticCurvePrivateKey = TOOL_KEY) -> str:
    """A compact JWS over exactly ``payload`` (raw text) under ``header``, ES256 with ``key``."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(payload.encode())}"
    r, s = decode_dss_signature(key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def token(
    claims: Mapping[str, Any] | None = None,
    *,
    header: Mapping[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    key: ec.EllipticCurvePrivateKey = TOOL_KEY,
    raw: Mapping[str, str] | None = None,
) -> str:
    """A good tool token for AUDIENCE with ``claims`` changed, ``drop`` removed, ``raw`` JSON text put in."""
    now = int(time.time())
    body: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "spiffe://example.org/agent",
        "aud": AUDIENCE,
        "client_id": "spiffe://example.org/agent",
        "iat": now,
        "nbf": now,
        "exp": now + 60,
        "jti": f"at-{time.monotonic_ns()}",
        "scope": "invoke",
        "token_class": "tool",
    } | dict(claims or {})
    for name in drop:
        del body[name]
    payload = json.dumps({name: f"@{name}@" for name in raw or {}} | body)
    for name, text in (raw or {}).items():
        payload = payload.replace(json.dumps(f"@{name}@"), text)
    return sign({"alg": "ES256", "typ": "at+jwt", "kid": TOOL_KID} | dict(header or {}), payload, key)


def certificate(common_name: str = "client") -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - datetime.timedelta(minutes=1))
        .not_valid_after(start + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )


OWN_CERTIFICATE = certificate("own")


@dataclass(frozen=True)
class Attempt:
    """One request to a resource server: what ``verify_request`` (or, without ``url``, ``verify``) gets."""

    authorization: str | None
    dpop: tuple[str, ...] = ()
    certificate: x509.Certificate | None = None
    scope: str = "invoke"
    url: str | None = URL

    def run(self, verifier: TokenVerifier) -> Any:
        if self.url is None:
            scheme, _, value = (self.authorization or "").partition(" ")
            proof = self.dpop[0] if self.dpop else None
            return verifier.verify(value, scheme=scheme, scope=self.scope, dpop_proof=proof, url=None)
        return verifier.verify_request(
            authorization=self.authorization,
            dpop=self.dpop,
            method="GET",
            url=self.url,
            client_certificate=self.certificate,
            scope=self.scope,
        )


def bearer(value: str, **settings: Any) -> Attempt:
    return Attempt(f"Bearer {value}", **settings)


def bound(claims: Mapping[str, Any] | None = None) -> str:
    return token({"cnf": {"jkt": HOLDER.jkt}} | dict(claims or {}))


def dpop(value: str, *proofs: str, **settings: Any) -> Attempt:
    return Attempt(f"DPoP {value}", dpop=proofs, **settings)


def replayed(verifier: TokenVerifier) -> Attempt:
    value = bound()
    attempt = dpop(value, HOLDER.proof("GET", URL, access_token=value))
    attempt.run(verifier)  # the first use is fine
    return attempt


def proof_with_hostile_member(value: str) -> str:
    """A proof whose header repeats a member name holding a quote, a backslash and CR LF."""
    evil = 'x"\\\r\nSet-Cookie: a=b'
    header = json.dumps({"typ": "dpop+jwt", "alg": "ES256"})[:-1] + f", {json.dumps(evil)}: 1" * 2 + "}"
    return f"{b64url(header.encode())}.{b64url(b'{}')}.{b64url(b'x' * 64)}"


def dpop_only(verifier: TokenVerifier, attempt: Attempt) -> Attempt:
    """``attempt`` at a service that takes DPoP-bound tokens only (``require_dpop=True``)."""
    verifier.require_dpop = True
    return attempt


Build = Callable[[TokenVerifier], Attempt]


def case(case_id: str, rule: str, build: Build) -> Any:
    return pytest.param(rule, build, id=f"{rule}:{case_id}")


CASES = [
    case("not-a-jws", "malformed", lambda v: bearer("not-a-token")),
    case("too-long", "malformed", lambda v: bearer("a.b." + "c" * 9000)),
    case("header-not-json", "malformed", lambda v: bearer(f"{b64url(b'{nope')}.e30.e30")),
    case("claims-not-json", "malformed", lambda v: bearer(sign({"alg": "ES256", "typ": "at+jwt", "kid": TOOL_KID}, "{nope"))),
    case("claims-nan", "malformed", lambda v: bearer(token(raw={"extra": "NaN"}))),
    case("signature-not-base64url", "malformed", lambda v: bearer(token().rsplit(".", 1)[0] + ".***")),
    case("typ-jwt", "typ", lambda v: bearer(token(header={"typ": "JWT"}))),
    case("no-typ", "typ", lambda v: bearer(token(header={"typ": None}))),
    case("alg-es384", "alg", lambda v: bearer(token(header={"alg": "ES384"}))),
    case("alg-none", "alg", lambda v: bearer(token(header={"alg": "none"}).rsplit(".", 1)[0] + ".")),
    case("crit", "crit", lambda v: bearer(token(header={"crit": ["exp"]}))),
    case("unknown-kid", "key", lambda v: bearer(token(header={"kid": "tool-unknown"}))),
    case("data-kid", "key", lambda v: bearer(token(header={"kid": DATA_KID}, key=DATA_KEY))),
    case("no-kid", "key", lambda v: bearer(token(header={"kid": None}))),
    case("tampered", "signature", lambda v: bearer(tampered(token()))),
    case("other-key", "signature", lambda v: bearer(token(key=DATA_KEY))),
    case("short-signature", "signature", lambda v: bearer(token().rsplit(".", 1)[0] + "." + b64url(b"x" * 63))),
    case("no-jti", "claims", lambda v: bearer(token(drop=("jti",)))),
    case("no-sub", "claims", lambda v: bearer(token(drop=("sub",)))),
    case("exp-text", "claims", lambda v: bearer(token({"exp": "soon"}))),
    case("exp-1e400", "claims", lambda v: bearer(token(raw={"exp": "1e400"}, drop=("exp",)))),
    case("nbf-text", "claims", lambda v: bearer(token({"nbf": "now"}))),
    case("scope-number", "claims", lambda v: bearer(token({"scope": 5}))),
    case("other-issuer", "issuer", lambda v: bearer(token({"iss": OTHER_ISSUER}))),
    case("other-audience", "audience", lambda v: bearer(token({"aud": OTHER_AUDIENCE}))),
    case("audience-list-of-two", "audience", lambda v: bearer(token({"aud": [AUDIENCE, OTHER_AUDIENCE]}))),
    case("data-class", "token_class", lambda v: bearer(token({"token_class": "data"}))),
    case("expired", "expired", lambda v: bearer(token({"exp": int(time.time()) - 60}))),
    case("nbf-ahead", "not_yet_valid", lambda v: bearer(token({"nbf": int(time.time()) + 600}))),
    case("iat-ahead", "not_yet_valid", lambda v: bearer(token({"iat": int(time.time()) + 600}))),
    case("bound-as-bearer", "scheme", lambda v: bearer(bound())),
    case("unbound-as-dpop", "scheme", lambda v: dpop(t := token(), HOLDER.proof("GET", URL, access_token=t))),
    case("cnf-kid", "cnf", lambda v: bearer(token({"cnf": {"kid": "x"}}))),
    case("cnf-string", "cnf", lambda v: bearer(token({"cnf": "jkt"}))),
    case("no-certificate", "mtls", lambda v: bearer(token({"cnf": {"x5t#S256": certificate_thumbprint(OWN_CERTIFICATE)}}))),
    case(
        "other-certificate",
        "mtls",
        lambda v: bearer(
            token({"cnf": {"x5t#S256": certificate_thumbprint(OWN_CERTIFICATE)}}), certificate=certificate("other")
        ),
    ),
    case("no-proof", "dpop_proof", lambda v: dpop(bound())),
    case("two-proofs", "dpop_proof", lambda v: dpop(t := bound(), *(HOLDER.proof("GET", URL, access_token=t),) * 2)),
    case("replayed", "dpop_proof", replayed),
    case("other-url", "dpop_proof", lambda v: dpop(t := bound(), HOLDER.proof("GET", "https://else.example/x", access_token=t))),
    case("other-token", "dpop_proof", lambda v: dpop(bound(), HOLDER.proof("GET", URL, access_token="x.y.z"))),
    case("hostile-proof", "dpop_proof", lambda v: dpop(t := bound(), proof_with_hostile_member(t))),
    case("other-key", "dpop_key", lambda v: dpop(t := bound(), DpopKey.generate().proof("GET", URL, access_token=t))),
    case("no-url", "dpop_url", lambda v: dpop(t := bound(), HOLDER.proof("GET", URL, access_token=t), url=None)),
    case("bearer-at-dpop-only-service", "unbound", lambda v: dpop_only(v, bearer(token()))),
    case("mtls-bound-at-dpop-only-service", "unbound", lambda v: dpop_only(v, bearer(token({"cnf": {"x5t#S256": certificate_thumbprint(OWN_CERTIFICATE)}}), certificate=OWN_CERTIFICATE))),
    case("revoked", "revoked", lambda v: bearer(token({"jti": REVOKED_JTI}))),
    case("no-admin-scope", "scope", lambda v: bearer(token(), scope="admin")),
]


def tampered(value: str) -> str:
    head, payload, signature = value.split(".")
    changed = json.loads(b64url_decode(payload)) | {"scope": "admin"}
    return f"{head}.{b64url(json.dumps(changed).encode())}.{signature}"


def parameters(challenge: str) -> dict[str, str]:
    assert CHALLENGE.match(challenge), f"not an RFC 6750 §3 challenge: {challenge!r}"
    return dict(re.findall(r'([a-z_]+)="([^"]*)"', challenge))


def refusal_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sts.verify" and "refused" in r.getMessage()]


def test_every_rule_has_a_case_and_is_documented() -> None:
    """Each rule of RULES is exercised below (MissingToken has its own test) and in the module docstring."""
    covered = {p.values[0] for p in CASES} | {"missing"}
    assert covered == set(RULES)
    assert sts.verify.__doc__ is not None
    for rule in RULES:
        assert f"``{rule}``" in sts.verify.__doc__, rule


@pytest.mark.parametrize(("rule", "build"), CASES)
def test_the_refusal_names_its_rule(rule: str, build: Build, caplog: pytest.LogCaptureFixture) -> None:
    verifier = make_verifier()
    attempt = build(verifier)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sts.verify"), pytest.raises(InvalidAccessToken) as refused:
        attempt.run(verifier)
    error = refused.value
    assert error.rule == rule
    assert str(error).endswith(f"(rule: {rule})"), str(error)
    challenge = error.headers()["WWW-Authenticate"]
    described = parameters(challenge)
    assert described["error_description"].endswith(f"(rule: {rule})"), challenge
    assert described["error"] == error.error
    assert error.to_json()["error_description"] == str(error)
    logged = refusal_logs(caplog)
    assert len(logged) == 1, logged  # one line per refusal
    assert f"(rule: {rule})" in logged[0]
    if rule == "scope":
        assert isinstance(error, InsufficientScope) and described["scope"] == "admin"
    if rule.startswith("dpop_"):
        assert isinstance(error, DpopProofRefused) and challenge.startswith('DPoP error="invalid_dpop_proof"')


@pytest.mark.parametrize(("rule", "build"), [c for c in CASES if c.values[0] != "dpop_url"])
def test_the_flask_answer_names_the_rule(rule: str, build: Build, caplog: pytest.LogCaptureFixture) -> None:
    """Over ``require_token``: the 401/403 challenge and body name the rule, the log line the request."""
    verifier = make_verifier()
    app = Flask("errors")

    @app.get("/invoke")
    @verifier.require_token("invoke", public_base_url="https://calc.example")
    def invoke() -> str:
        return "ok"

    @app.get("/admin")
    @verifier.require_token("admin", public_base_url="https://calc.example")
    def admin() -> str:
        return "ok"

    attempt = build(verifier)
    headers = {"Authorization": attempt.authorization or ""}
    environ = {}
    if attempt.certificate is not None:
        environ["SSL_CLIENT_CERT"] = attempt.certificate.public_bytes(serialization.Encoding.PEM).decode()
    path = "/admin" if attempt.scope == "admin" else "/invoke"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sts.verify"):
        response = app.test_client().get(
            path,
            headers=[*headers.items(), *(("DPoP", proof) for proof in attempt.dpop)],
            environ_base=environ,
        )
    assert response.status_code == (403 if rule == "scope" else 401)
    challenges = response.headers.getlist("WWW-Authenticate")
    assert len(challenges) == 1
    assert parameters(challenges[0])["error_description"].endswith(f"(rule: {rule})")
    assert response.get_json()["error_description"].endswith(f"(rule: {rule})")
    logged = refusal_logs(caplog)
    assert len(logged) == 1, logged  # the verifier's line; error_response does not repeat it
    assert f"(rule: {rule}) [GET {path}]" in logged[0]


NO_ORACLE = [c for c in CASES if c.values[0] in ("issuer", "audience", "token_class", "key", "signature")]


@pytest.mark.parametrize(("rule", "build"), NO_ORACLE)
def test_the_challenge_names_no_expected_value(
    rule: str, build: Build, caplog: pytest.LogCaptureFixture
) -> None:
    """Not ours, for whatever reason: one fixed sentence and the rule; the values only in the log."""
    verifier = make_verifier()
    attempt = build(verifier)
    with caplog.at_level(logging.INFO, logger="sts.verify"), pytest.raises(InvalidAccessToken) as refused:
        attempt.run(verifier)
    error = refused.value
    assert str(error) == f"{NOT_OURS} (rule: {rule})"
    public = error.headers()["WWW-Authenticate"] + json.dumps(error.to_json())
    for value in (AUDIENCE, ISSUER, OTHER_AUDIENCE, OTHER_ISSUER, TOOL_KID, DATA_KID, "tool-unknown", "data"):
        assert value not in public, (value, public)
    assert error.detail is not None and error.detail in refusal_logs(caplog)[0]
    if rule in ("issuer", "audience", "token_class"):  # the log does say what was expected
        assert repr({"issuer": ISSUER, "audience": AUDIENCE, "token_class": "tool"}[rule]) in error.detail


def test_the_detail_says_what_the_token_held_and_what_was_expected(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sts.verify"), pytest.raises(InvalidAccessToken) as refused:
        bearer(token({"aud": OTHER_AUDIENCE})).run(make_verifier())
    assert refused.value.detail == f"aud '{OTHER_AUDIENCE}', expected '{AUDIENCE}'"
    assert refused.value.detail in refusal_logs(caplog)[0]


def test_caller_text_in_the_log_is_escaped_and_bounded(caplog: pytest.LogCaptureFixture) -> None:
    forged = "x\n2026-01-01 00:00:00,000 INFO sts.verify: FORGED\r\u2028" + "y" * 500
    with caplog.at_level(logging.INFO, logger="sts.verify"), pytest.raises(InvalidAccessToken) as refused:
        bearer(token({"aud": forged})).run(make_verifier())
    (line,) = refusal_logs(caplog)
    assert "\n" not in line and "\r" not in line and "\u2028" not in line
    assert "\\x0a2026-01-01" in line and f"({len(forged)} chars)" in line
    assert "FORGED" not in refused.value.headers()["WWW-Authenticate"]


def test_a_hostile_proof_never_reaches_the_challenge() -> None:
    """A DPoP member name with a quote, a backslash and CR LF stays in the detail; the answer is RFC form."""
    value = bound()
    with pytest.raises(DpopProofRefused) as refused:
        dpop(value, proof_with_hostile_member(value)).run(make_verifier())
    challenge = refused.value.headers()["WWW-Authenticate"]
    assert "Set-Cookie" not in challenge and "Set-Cookie" not in str(refused.value)
    assert refused.value.detail is not None and "Set-Cookie" in refused.value.detail
    parameters(challenge)


def test_missing_token_names_its_rule_but_the_challenge_carries_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    verifier = make_verifier()
    for authorization in (None, "Basic dXNlcjpwYXNz", "Bearer "):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sts.verify"), pytest.raises(MissingToken) as refused:
            Attempt(authorization).run(verifier)
        assert str(refused.value).endswith("(rule: missing)")
        assert "(rule: missing)" in refusal_logs(caplog)[0]
    app = Flask("missing")

    @app.get("/invoke")
    @verifier.require_token("invoke")
    def invoke() -> str:
        return "ok"

    response = app.test_client().get("/invoke")
    assert response.status_code == 401
    assert response.headers.getlist("WWW-Authenticate") == ["Bearer", 'DPoP algs="ES256 EdDSA Ed25519"']
    assert response.get_json()["error_description"].endswith("(rule: missing)")


def test_an_unknown_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="not a rule"):
        InvalidAccessToken("audiance", NOT_OURS)


# --- the Workload API at construction --------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A directory with a short path (a unix socket path has at most 107 bytes)."""
    path = tempfile.mkdtemp(prefix="vsock", dir="/tmp")
    try:
        yield path
    finally:
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)


def construct(socket_address: str | None, **settings: Any) -> TokenVerifier:
    return TokenVerifier(
        issuer=ISSUER, audience=AUDIENCE, token_class="tool", socket=socket_address, timeout=1, **settings
    )


def refused_at_construction(socket_address: str | None) -> WorkloadApiUnavailable:
    start = time.monotonic()
    with pytest.raises(WorkloadApiUnavailable) as refused:
        construct(socket_address)
    assert time.monotonic() - start < 2.0
    assert isinstance(refused.value, ConfigError)
    return refused.value


def test_a_socket_that_does_not_exist_fails_at_construction(short_dir: str) -> None:
    address = f"unix://{short_dir}/missing.sock"
    refused = refused_at_construction(address)
    assert refused.socket == address
    assert address in str(refused) and "does not exist" in str(refused) and "socket=" in str(refused)


def test_a_socket_nobody_listens_on_fails_at_construction(short_dir: str) -> None:
    path = f"{short_dir}/dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(path)  # the file stays; nothing listens
    refused = refused_at_construction(f"unix://{path}")
    assert f"unix://{path}" in str(refused) and "nothing listening" in str(refused)


def test_a_socket_that_is_not_a_workload_api_fails_at_construction_within_the_timeout(short_dir: str) -> None:
    """Something accepts connections but never answers: the JWT-SVID fetch runs into ``timeout``."""
    path = f"{short_dir}/mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(path)
        mute.listen(8)
        accepted: list[socket.socket] = []
        stop = threading.Event()

        def accept() -> None:
            mute.settimeout(0.1)
            while not stop.is_set():
                try:
                    accepted.append(mute.accept()[0])
                except TimeoutError:
                    continue

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            refused = refused_at_construction(f"unix://{path}")
        finally:
            stop.set()
            thread.join(timeout=5)
            for connection in accepted:
                connection.close()
    assert f"unix://{path}" in str(refused) and "no JWT-SVID" in str(refused)


def test_a_bare_socket_path_fails_at_construction_with_a_hint(short_dir: str) -> None:
    refused = refused_at_construction(f"{short_dir}/agent.sock")
    assert f"unix://{short_dir}/agent.sock" in str(refused)


def test_a_socket_from_the_environment_is_named_with_its_origin(
    short_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = f"unix://{short_dir}/env.sock"
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", address)
    refused = refused_at_construction(None)
    assert address in str(refused) and "SPIFFE_ENDPOINT_SOCKET" in str(refused)


def test_no_socket_at_all_fails_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPIFFE_ENDPOINT_SOCKET", raising=False)
    refused = refused_at_construction(None)
    assert refused.socket is None
    assert "SPIFFE_ENDPOINT_SOCKET" in str(refused) and "socket=" in str(refused)


class UnreachableSvids:
    """An SvidSource that must not be asked at construction."""

    asked = 0

    def jwt_svid(self, audience: str) -> str:
        self.asked += 1
        raise AssertionError("asked at construction")

    def x509_svid(self) -> tuple[list[x509.Certificate], Any]:
        raise AssertionError("asked at construction")

    def x509_authorities(self) -> list[x509.Certificate]:
        raise AssertionError("asked at construction")


def test_an_explicit_svid_source_or_revocation_check_is_not_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPIFFE_ENDPOINT_SOCKET", raising=False)
    svids = UnreachableSvids()
    construct("unix:///nonexistent/agent.sock", svids=svids)
    assert svids.asked == 0
    construct("unix:///nonexistent/agent.sock", revocation=Revocations())
    TokenVerifier.without_revocation_check(issuer=ISSUER, audience=AUDIENCE, token_class="tool")
