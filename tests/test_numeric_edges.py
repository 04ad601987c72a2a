"""Crafted numbers, strings and URIs at every parser (issue 11): each is a typed refusal, never an exception.

The outside tester's inputs, one class at a time: JSON constants (``NaN``, ``Infinity``), integers too
large for a float or for 64 bits, numbers that overflow to infinity, unpaired surrogates, deep nesting,
malformed URIs (``http://[::1``). Each test signs its tokens with a real key, so the refusal is the
rule under test and never merely a bad signature. The last tests send the tester's requests to the real
server over HTTP.
"""

from __future__ import annotations

import datetime
import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from flask import Flask
from jwt.algorithms import ECAlgorithm

from sts import strict_json
from sts.admin import Admin
from sts.audit import AuditLog
from sts.binding import DpopVerifier, InvalidDpopProof, access_token_hash, jwk_thumbprint
from sts.callers import Caller
from sts.catalog import Catalog, CatalogEntry, TokenClass
from sts.config import load_settings
from sts.errors import ConfigError, InvalidRequest, InvalidTarget, InvalidToken, TemporarilyUnavailable
from sts.keys import KeyRing
from sts.spiffeid import SpiffeId, SpiffeIdError, TrustDomain
from sts.store.memory import MemoryStore
from sts.svid import JwtSvidVerifier
from sts.tasks import TaskRequest
from sts.trust import BundleError, TrustBundle
from sts.verify import DpopProofRefused, Introspection, InvalidAccessToken, TokenVerifier
from tests.authority import TestAuthority, b64url, trust_store
from tests.conftest import ADMIN, RunningServer

NOW = 1_700_000_000
HUGE = "1" + "0" * 400  # a 401-digit integer: too large for a float (OverflowError on every conversion)
HUGER = "9" * 5000  # beyond Python's int/str conversion limit (ValueError from int())
_ES256 = ECAlgorithm(ECAlgorithm.SHA256)


def sign_es256(key: ec.EllipticCurvePrivateKey, header: dict[str, Any], payload: str) -> str:
    """A compact JWS over exactly ``payload`` (raw JSON text: NaN, huge integers, anything)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(payload.encode())}"
    return f"{signing_input}.{b64url(_ES256.sign(signing_input.encode('ascii'), key))}"


def json_object(members: dict[str, str]) -> str:
    """A JSON object from member names and the raw JSON text of each value."""
    return "{" + ",".join(f"{json.dumps(name)}:{value}" for name, value in members.items()) + "}"


# --- the shared mechanism --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "member"),
    [
        ('{"iat": NaN}', "iat"),
        ('{"a": [1, [2, -Infinity]]}', "a"),
        ('{"exp": ' + HUGE + "}", "exp"),
        ('{"exp": ' + HUGER + "}", "exp"),
        ('{"exp": -' + HUGE + "}", "exp"),
        ('{"exp": 9223372036854775808}', "exp"),
        ('{"exp": 1e400}', "exp"),
        ('{"ttl": 60, "ttl": 6000}', "ttl"),
        ('{"a": {"b": NaN}}', "b"),
        ("[1e999]", None),
        ('"\\ud800"', None),
        ('{"\\udc00": 1}', None),
        ("[" * 5000 + "]" * 5000, None),
        (b'{"a": "\xff"}', None),
    ],
)
def test_strict_json_refuses_and_names_the_member(text: str | bytes, member: str | None) -> None:
    with pytest.raises(strict_json.JsonError) as refused:
        strict_json.loads(text)
    assert refused.value.member == member


def test_strict_json_keeps_what_is_json() -> None:
    value = strict_json.loads(
        '{"i": 9223372036854775807, "n": -9223372036854775807, "f": 1.5e300, '
        '"s": "\\ud83d\\ude00 \\\\ud800", "l": [[0.5]]}'
    )
    assert value == {"i": 2**63 - 1, "n": -(2**63 - 1), "f": 1.5e300, "s": "😀 \\ud800", "l": [[0.5]]}


def test_strict_json_refusals_on_other_threads_never_let_one_through() -> None:
    """The fast parse learns of refused numbers from a counter shared by every thread: a refusal made
    beside it may only cost a second parse, never accept a text of its own that holds one."""
    good = '{"exp": 1796000000, "scope": "read", "l": [1, 2]}'
    bad = ['{"exp": NaN}', '{"a": [1, [2, -Infinity]]}', '{"exp": 9223372036854775808}', '{"x": 1e400}']

    def parse(n: int) -> str:
        text = bad[n % len(bad)] if n % 2 else good
        try:
            strict_json.loads(text)
        except strict_json.JsonError:
            return "refused" if n % 2 else "wrongly refused"
        return "wrongly accepted" if n % 2 else "accepted"

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(parse, range(4000)))
    assert outcomes.count("accepted") == outcomes.count("refused") == 2000


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), 10**400, -1, 253_402_300_800, True, "1", None, [1]]
)
def test_numeric_date_refuses(value: object) -> None:
    assert strict_json.numeric_date(value) is None


def test_numeric_date_accepts() -> None:
    assert strict_json.numeric_date(NOW) == NOW
    assert strict_json.numeric_date(0.5) == 0.5
    assert strict_json.numeric_date(253_402_300_799) == 253_402_300_799


@pytest.mark.parametrize(
    "text", ["http://[::1", "http://[::1]:99999/", "http://h:port/", "https://x/to\nken", "https://x/ä", 1]
)
def test_split_uri_refuses(text: object) -> None:
    assert strict_json.split_uri(text) is None


# --- 1. DPoP proofs (sts.binding) -------------------------------------------------------------------

TOKEN_URL = "https://sts.example/token"
_DPOP_KEY = ec.generate_private_key(ec.SECP256R1())
_DPOP_JWK = ECAlgorithm.to_jwk(_DPOP_KEY.public_key(), as_dict=True)


def dpop_proof(claims: dict[str, str], header: dict[str, Any] | None = None, *, now: int = NOW) -> str:
    """A proof for POST TOKEN_URL signed by a real key; ``claims`` override members (raw JSON text)."""
    members = {"jti": '"proof-1"', "htm": '"POST"', "htu": json.dumps(TOKEN_URL), "iat": str(now)} | claims
    full_header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": _DPOP_JWK} | (header or {})
    return sign_es256(_DPOP_KEY, full_header, json_object(members))


def dpop_verify(proof: str, *, access_token: str | None = None) -> None:
    DpopVerifier(use_once=lambda key, expires_at: True).verify(
        proof, method="POST", urls=(TOKEN_URL,), access_token=access_token, now=float(NOW)
    )


def test_dpop_baseline_proof_verifies() -> None:
    dpop_verify(dpop_proof({}))
    dpop_verify(dpop_proof({"iat": str(NOW + 0.5)}))


@pytest.mark.parametrize(
    "claims",
    [
        {"iat": "NaN"},
        {"iat": "Infinity"},
        {"iat": "-Infinity"},
        {"iat": HUGE},
        {"iat": "-" + HUGE},
        {"iat": HUGER},
        {"iat": "1e400"},
        {"iat": "true"},
        {"iat": '"1700000000"'},
        {"htu": '"http://[::1"'},
        {"htu": '"https://sts.example:99999/token"'},
        {"htu": '"https://sts.example/to\\nken"'},  # urlsplit would delete the newline and match
        {"htu": HUGE},
        {"htu": '["https://sts.example/token"]'},
        {"jti": HUGE},
        {"jti": "7"},
        {"jti": '["a"]'},
        {"jti": json.dumps("j" * 300)},
        {"jti": '"\\ud800"'},  # would reach the store's replay key and fail to encode there
        {"htm": '["POST"]'},
        {"htm": HUGE},
        {"extra": "NaN"},
        {"extra": "[" * 900 + "]" * 900},
    ],
    ids=lambda claims: next(iter(claims)) + "=" + next(iter(claims.values()))[:16],
)
def test_dpop_crafted_claims_are_invalid_dpop_proof(claims: dict[str, str]) -> None:
    with pytest.raises(InvalidDpopProof):
        dpop_verify(dpop_proof(claims))


@pytest.mark.parametrize(
    "header",
    [
        {"jwk": {"kty": "EC", "crv": "P-256", "x": 1, "y": 2}},
        {"jwk": {"kty": "EC", "crv": "P-256", "x": ["a"], "y": None}},
        {"jwk": {"kty": "OKP", "crv": "Ed25519", "x": 5}, "alg": "EdDSA"},
        {"crit": ["exp"]},
    ],
)
def test_dpop_crafted_headers_are_invalid_dpop_proof(header: dict[str, Any]) -> None:
    with pytest.raises(InvalidDpopProof):
        dpop_verify(dpop_proof({}, header))


def test_dpop_header_with_deep_nesting_or_constants_is_invalid_dpop_proof() -> None:
    payload = json_object({"jti": '"a"', "htm": '"POST"', "htu": json.dumps(TOKEN_URL), "iat": str(NOW)})
    for header_text in (
        '{"typ":"dpop+jwt","alg":"ES256","z":' + "[" * 1100 + "]" * 1100 + "}",
        '{"typ":"dpop+jwt","alg":"ES256","z":NaN}',
    ):
        signing_input = f"{b64url(header_text.encode())}.{b64url(payload.encode())}"
        proof = f"{signing_input}.{b64url(_ES256.sign(signing_input.encode(), _DPOP_KEY))}"
        with pytest.raises(InvalidDpopProof):
            dpop_verify(proof)


def test_dpop_ath_that_is_not_a_string_is_refused() -> None:
    with pytest.raises(InvalidDpopProof):
        dpop_verify(dpop_proof({"ath": HUGE}), access_token="a.b.c")
    dpop_verify(dpop_proof({"ath": json.dumps(access_token_hash("a.b.c"))}), access_token="a.b.c")


# --- 2. the resource server's verifier (sts.verify) -------------------------------------------------

ISSUER = "https://sts.example"
AUDIENCE = "tool:calc"
RS_URL = "https://calc.example/invoke"
_AT_KEY = ec.generate_private_key(ec.SECP256R1())
KID = "tool-test-key"


class FakeSts(requests.Session):
    """The STS as a resource server sees it: RFC 8414 metadata, the JWKS, introspection answers."""

    def __init__(self, *, jwks: bytes | None = None, introspection: bytes = b'{"active": false}') -> None:
        super().__init__()
        jwk = ECAlgorithm.to_jwk(_AT_KEY.public_key(), as_dict=True) | {"kid": KID, "use": "sig"}
        self.jwks = jwks if jwks is not None else json.dumps({"keys": [jwk]}).encode()
        self.introspection = introspection

    def get(self, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        if str(url).endswith("/.well-known/oauth-authorization-server"):
            return _response(json.dumps({"issuer": ISSUER, "jwks_uri": f"{ISSUER}/jwks.json"}).encode())
        return _response(self.jwks)

    def post(self, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        return _response(self.introspection)


def _response(body: bytes) -> requests.Response:
    response = requests.Response()
    response.status_code = 200
    response._content = body
    response.headers["Content-Type"] = "application/json"
    return response


def verifier(session: FakeSts | None = None) -> TokenVerifier:
    return TokenVerifier.without_revocation_check(
        issuer=ISSUER, audience=AUDIENCE, token_class="tool", session=session or FakeSts(), clock=lambda: NOW
    )


def access_token(claims: dict[str, str] | None = None, header: str | None = None) -> str:
    """An at+jwt signed with the key the fake STS publishes; ``claims`` override members (raw JSON)."""
    members = {
        "iss": json.dumps(ISSUER),
        "sub": '"spiffe://example.org/agent"',
        "aud": json.dumps(AUDIENCE),
        "client_id": '"spiffe://example.org/agent"',
        "jti": '"at-1"',
        "token_class": '"tool"',
        "scope": '"invoke"',
        "exp": str(NOW + 60),
        "iat": str(NOW),
    } | (claims or {})
    header_text = header or json.dumps({"alg": "ES256", "kid": KID, "typ": "at+jwt"})
    signing_input = f"{b64url(header_text.encode())}.{b64url(json_object(members).encode())}"
    r, s = decode_dss_signature(_AT_KEY.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def test_verifier_baseline_token_verifies() -> None:
    assert verifier().verify(access_token(), scope="invoke").expires_at == NOW + 60


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": "NaN"},
        {"exp": "Infinity"},
        {"exp": HUGE},
        {"exp": HUGER},
        {"exp": "1e400"},
        {"exp": "true"},
        {"exp": str(10**15)},
        {"iat": "NaN"},
        {"iat": "-" + HUGE},
        {"nbf": "NaN"},
        {"nbf": HUGE},
        {"scope": "NaN"},
        {"extra": "[" * 2000 + "]" * 2000},
        {"sub": '"\\udfff"'},
        {"cnf": '{"x5t#S256": "\\u00e9"}'},
    ],
    ids=lambda claims: next(iter(claims)) + "=" + next(iter(claims.values()))[:16],
)
def test_verifier_crafted_claims_are_invalid_token(claims: dict[str, str]) -> None:
    with pytest.raises(InvalidAccessToken) as refused:
        verifier().verify(access_token(claims), scope="invoke")
    assert refused.value.error == "invalid_token"


def test_verifier_deeply_nested_header_is_invalid_token() -> None:
    header = '{"alg":"ES256","kid":"' + KID + '","typ":"at+jwt","z":' + "[" * 1500 + "]" * 1500 + "}"
    with pytest.raises(InvalidAccessToken):
        verifier().verify(access_token(header=header))


_HOLDER_KEY = ec.generate_private_key(ec.SECP256R1())
_HOLDER_JWK = ECAlgorithm.to_jwk(_HOLDER_KEY.public_key(), as_dict=True)
HOLDER_JKT = jwk_thumbprint(_HOLDER_JWK)


def _dpop_for(token: str, claims: dict[str, str], *, now: int = NOW) -> str:
    """A resource-server proof (RFC 9449 §7) by the key the token is bound to, with ``claims`` changed."""
    members = {
        "jti": json.dumps(secrets.token_urlsafe(8)),
        "htm": '"GET"',
        "htu": json.dumps(RS_URL),
        "iat": str(now),
        "ath": json.dumps(access_token_hash(token)),
    } | claims
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": _HOLDER_JWK}
    return sign_es256(_HOLDER_KEY, header, json_object(members))


@pytest.mark.parametrize(
    "claims",
    [{"iat": "NaN"}, {"iat": HUGE}, {"htu": '"http://[::1"'}, {"jti": HUGE}, {"htm": "[1]"}],
    ids=lambda claims: next(iter(claims)) + "=" + next(iter(claims.values()))[:16],
)
def test_verifier_crafted_dpop_proof_is_invalid_dpop_proof(claims: dict[str, str]) -> None:
    token = access_token({"cnf": json.dumps({"jkt": HOLDER_JKT})})
    check = verifier()
    check.verify_request(authorization=f"DPoP {token}", dpop=[_dpop_for(token, {})], method="GET", url=RS_URL)
    with pytest.raises(DpopProofRefused) as refused:
        check.verify_request(
            authorization=f"DPoP {token}", dpop=[_dpop_for(token, claims)], method="GET", url=RS_URL
        )
    assert refused.value.error == "invalid_dpop_proof"
    assert refused.value.headers()["WWW-Authenticate"].startswith('DPoP error="invalid_dpop_proof"')


def test_verifier_jkt_that_is_not_ascii_is_refused_not_a_type_error() -> None:
    token = access_token({"cnf": '{"jkt": "\\u00e9"}'})
    with pytest.raises(DpopProofRefused):
        verifier().verify(token, scheme="DPoP", dpop_proof=_dpop_for(token, {}), url=RS_URL, now=NOW)


def test_verifier_x5t_that_is_not_ascii_is_refused_not_a_type_error() -> None:
    token = access_token({"cnf": '{"x5t#S256": "\\u00e9"}'})
    with pytest.raises(InvalidAccessToken) as refused:
        verifier().verify(token, client_certificate=_certificate(), now=NOW)
    assert refused.value.rule == "mtls"


def _certificate() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")])
    start = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )


@pytest.mark.parametrize(
    "jwks",
    [b'{"keys": [], "x": NaN}', b'{"keys": ' + b"[" * 3000 + b"]" * 3000 + b"}", b'{"keys": [], "keys": []}'],
    ids=["nan", "deep", "duplicate"],
)
def test_verifier_refuses_a_jwks_that_is_not_json(jwks: bytes) -> None:
    with pytest.raises(TemporarilyUnavailable):
        verifier(FakeSts(jwks=jwks)).verify(access_token())


def test_introspection_answer_that_is_not_json_is_unavailable() -> None:
    nested = b'{"active": true, "jti": "at-1", "x": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    check = Introspection(f"{ISSUER}/introspect", lambda: "svid", session=FakeSts(introspection=nested))
    with pytest.raises(TemporarilyUnavailable):
        check.active(access_token(), {"jti": "at-1", "exp": NOW + 60}, NOW)


def test_require_token_answers_400s_never_500() -> None:
    app = Flask(__name__)
    guard = TokenVerifier.without_revocation_check(
        issuer=ISSUER, audience=AUDIENCE, token_class="tool", session=FakeSts()
    )

    @app.get("/invoke")
    @guard.require_token("invoke", public_base_url="https://calc.example")
    def invoke() -> str:
        return "ok"

    now = int(time.time())
    token = access_token({"cnf": json.dumps({"jkt": HOLDER_JKT}), "exp": str(now + 60), "iat": str(now)})
    client = app.test_client()
    assert (
        client.get(
            "/invoke", headers={"Authorization": f"DPoP {token}", "DPoP": _dpop_for(token, {}, now=now)}
        ).status_code
        == 200
    )
    proof = _dpop_for(token, {"iat": "NaN"})
    response = client.get("/invoke", headers={"Authorization": f"DPoP {token}", "DPoP": proof})
    assert response.status_code == 401
    assert response.json is not None and response.json["error"] == "invalid_dpop_proof"
    assert response.headers["WWW-Authenticate"].startswith('DPoP error="invalid_dpop_proof"')
    response = client.get("/invoke", headers={"Authorization": f"Bearer {access_token({'exp': HUGE})}"})
    assert response.status_code == 401
    assert response.json is not None and response.json["error"] == "invalid_token"


# --- 3. JWT-SVIDs and client assertions (sts.svid) --------------------------------------------------

SVID_AUDIENCE = "https://sts.example"
SUBJECT = "spiffe://example.org/agent"


@pytest.fixture(scope="module")
def authority() -> TestAuthority:
    return TestAuthority("example.org")


def svid(authority: TestAuthority, claims: dict[str, str]) -> str:
    members = {
        "sub": json.dumps(SUBJECT),
        "aud": json.dumps(SVID_AUDIENCE),
        "exp": str(NOW + 300),
        "iat": str(NOW),
    } | claims
    header = {"alg": "ES256", "kid": authority.kid, "typ": "JWT"}
    assert isinstance(authority.private_key, ec.EllipticCurvePrivateKey)
    return sign_es256(authority.private_key, header, json_object(members))


def svid_verify(authority: TestAuthority, token: str) -> None:
    JwtSvidVerifier(trust_store(authority), SVID_AUDIENCE).verify(token, now=NOW)


def test_svid_baseline_verifies(authority: TestAuthority) -> None:
    svid_verify(authority, svid(authority, {}))
    svid_verify(authority, svid(authority, {"nbf": str(NOW - 0.5)}))


@pytest.mark.parametrize(
    ("claims", "rule", "named"),
    [
        ({"exp": HUGE}, "exp", "exp"),
        ({"nbf": HUGE}, "nbf", "nbf"),
        ({"iat": HUGE}, "iat", "iat"),
        ({"exp": "-" + HUGE}, "exp", "exp"),
        ({"exp": HUGER}, "exp", "exp"),
        ({"exp": "1e400"}, "exp", "exp"),
        ({"nbf": "-1e400"}, "nbf", "nbf"),
        ({"exp": "NaN"}, "malformed", "exp"),
        ({"nbf": "-Infinity"}, "malformed", "nbf"),
        ({"pad": HUGE}, "malformed", "pad"),
        ({"aud": "[" + HUGE + "]"}, "malformed", "aud"),
        ({"pad": '"\\ud800"'}, "malformed", "surrogate"),
        ({"exp": str(10**15)}, "exp", "exp"),
        ({"exp": str(2**63 - 1)}, "exp", "exp"),
        ({"nbf": "-1"}, "nbf", "nbf"),
        ({"iat": "-1"}, "iat", "iat"),
        ({"iat": "false"}, "iat", "iat"),
    ],
    ids=lambda v: v if isinstance(v, str) else next(iter(v)) + "=" + next(iter(v.values()))[:16],
)
def test_svid_crafted_time_claims_are_invalid_token(
    authority: TestAuthority, claims: dict[str, str], rule: str, named: str
) -> None:
    with pytest.raises(InvalidToken) as refused:
        svid_verify(authority, svid(authority, claims))
    assert refused.value.rule == rule
    assert named in refused.value.description
    assert refused.value.error == "invalid_request"


# --- 4. the catalog (resource=) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "resource",
    ["http://[::1", "https://[::1]:99999/", "https://search.internal:x/", "https://search.internal/\n"],
)
def test_catalog_malformed_resource_is_invalid_target(resource: str) -> None:
    catalog = Catalog(
        [CatalogEntry("tool:s", TokenClass.TOOL, frozenset({"invoke"}), resource="https://search.internal/")]
    )
    with pytest.raises(InvalidTarget):
        catalog.resolve([], [resource])


# --- 5. our own tokens, bundles, bodies, configuration ----------------------------------------------


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    from sts.config import KeySettings

    return KeyRing.load_or_create(KeySettings(dir=tmp_path / "keys"), now=NOW)


def _issued(ring: KeyRing, claims: dict[str, str], header: str | None = None) -> str:
    key = ring.active(TokenClass.TOOL)
    members = {
        "iss": json.dumps(ISSUER),
        "sub": json.dumps(SUBJECT),
        "aud": json.dumps(AUDIENCE),
        "client_id": json.dumps(SUBJECT),
        "jti": '"jti-1"',
        "token_class": '"tool"',
        "exp": str(NOW + 60),
        "iat": str(NOW),
        "nbf": str(NOW),
    } | claims
    header_b64 = b64url(header.encode()) if header else key.header_b64
    signing_input = f"{header_b64}.{b64url(json_object(members).encode())}"
    r, s = decode_dss_signature(key._private_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def test_issued_token_baseline_is_active(ring: KeyRing) -> None:
    claims = ring.verify_issued(_issued(ring, {}), issuer=ISSUER, now=NOW)
    assert claims is not None and claims["jti"] == "jti-1"


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": "NaN"},
        {"exp": HUGE},
        {"exp": "1e400"},
        {"nbf": '"0"'},
        {"iat": '"0"'},
        {"iat": "null"},
        {"aud": '["tool:calc"]'},
        {"sub": "1"},
        {"jti": '{"a": 1}'},
        {"task_id": "5"},
        {"client_id": "[]"},
        {"extra": '"\\ud800"'},
    ],
    ids=lambda claims: next(iter(claims)) + "=" + next(iter(claims.values()))[:16],
)
def test_issued_token_with_crafted_claims_is_not_active(ring: KeyRing, claims: dict[str, str]) -> None:
    assert ring.verify_issued(_issued(ring, claims), issuer=ISSUER, now=NOW) is None


@pytest.mark.parametrize(
    "header",
    [
        '{"alg":"ES256","typ":"at+jwt","kid":["tool-x"]}',
        '{"alg":"ES256","typ":"at+jwt","kid":{}}',
        '{"alg":"ES256","typ":"at+jwt","kid":"k","z":' + "[" * 3000 + "]" * 3000 + "}",
        '{"alg":"ES256","typ":"at+jwt","kid":"k","z":NaN}',
    ],
    ids=["kid-list", "kid-object", "deep", "nan"],
)
def test_issued_token_with_crafted_header_is_not_active(ring: KeyRing, header: str) -> None:
    assert ring.verify_issued(_issued(ring, {}, header), issuer=ISSUER, now=NOW) is None


def test_signing_refuses_non_json_numbers(ring: KeyRing) -> None:
    with pytest.raises(ValueError, match="JSON compliant"):
        ring.sign(TokenClass.TOOL, {"exp": float("nan")})


def _bundle(document: str) -> bytes:
    return document.encode()


@pytest.mark.parametrize(
    "document",
    [
        '{"keys": [], "spiffe_refresh_hint": ' + HUGE + "}",
        '{"keys": [], "spiffe_sequence": ' + HUGE + "}",
        '{"keys": [], "spiffe_sequence": ' + HUGER + "}",
        '{"keys": [], "spiffe_refresh_hint": 1e400}',
        '{"keys": [], "spiffe_refresh_hint": 1.5}',
        '{"keys": [1, "a", null]}',
        '{"keys": [{"kty": "RSA", "use": "jwt-svid", "kid": "k", "n": 5, "e": "AQAB"}]}',
        '{"keys": [{"kty": "EC", "crv": "P-256", "use": "jwt-svid", "kid": "k", "x": 1, "y": [2]}]}',
        '{"keys": [{"kty": "EC", "crv": "P-256", "use": "jwt-svid", "kid": "k", "x": "\\ud800", "y": "a"}]}',
    ],
    ids=[
        "hint-huge",
        "sequence-huge",
        "sequence-huger",
        "hint-inf",
        "hint-float",
        "keys-not-objects",
        "rsa-n-int",
        "ec-x-int",
        "ec-x-surrogate",
    ],
)
def test_bundle_with_crafted_values_is_a_bundle_error(document: str) -> None:
    domain = TrustDomain("example.org")
    with pytest.raises(BundleError):
        TrustBundle.from_spiffe_bundle(domain, _bundle(document))
    with pytest.raises(BundleError):
        TrustBundle.from_jwt_jwks(domain, _bundle(document.replace('"use": "jwt-svid", ', "")))


CATALOG = Catalog([CatalogEntry("tool:calc", TokenClass.TOOL, frozenset({"invoke"}))])


def task_body(**fields: Any) -> dict[str, Any]:
    return {
        "assignee": "spiffe://example.org/agent",
        "targets": [{"target": "tool:calc", "scopes": ["invoke"]}],
        "purpose": "test",
        "ttl_seconds": 60,
    } | fields


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ttl_seconds", float("nan")),
        ("ttl_seconds", float("inf")),
        ("ttl_seconds", 10**400),
        ("ttl_seconds", -1),
        ("ttl_seconds", True),
        ("ttl_seconds", "60"),
        ("ttl_seconds", 60.0),
        ("purpose", "\ud800"),
        ("purpose", 10**400),
        ("assignee", 10**400),
        ("assignee", ["spiffe://example.org/agent"]),
    ],
)
def test_task_body_values_are_refused_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(InvalidRequest) as refused:
        TaskRequest.from_json(task_body(**{field: value}), CATALOG, 3600)
    assert field in refused.value.description
    assert refused.value.status == 400


@pytest.fixture
def admin(tmp_path: Path) -> Admin:
    return Admin(
        store=MemoryStore(), catalog=CATALOG, audit=AuditLog(str(tmp_path / "audit.jsonl")), max_token_ttl=300
    )


ADMIN_CALLER = Caller(SpiffeId.parse("spiffe://example.org/admin"), "spiffe_jwt")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"spiffe_id": SUBJECT, "until": float("nan")}, "until"),
        ({"spiffe_id": SUBJECT, "until": float("inf")}, "until"),
        ({"spiffe_id": SUBJECT, "until": 10**400}, "until"),
        ({"spiffe_id": SUBJECT, "until": -1}, "until"),
        ({"spiffe_id": SUBJECT, "until": True}, "until"),
        ({"spiffe_id": SUBJECT, "until": str(NOW + 60)}, "until"),
        ({"jti": "\udc00"}, "jti"),
        ({"task_id": "\udc00"}, "task_id"),
        ({"jti": "x", "reason": "\ud800"}, "reason"),
        ({"jti": 10**400}, "jti"),
    ],
)
def test_revocation_body_values_are_refused_naming_the_field(
    admin: Admin, body: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        admin.revoke(ADMIN_CALLER, {"reason": "test"} | body, request_id="r", now=NOW)
    assert field in refused.value.description


@pytest.mark.parametrize("expires_at", [float("nan"), float("inf"), 10**400, -1, True, str(NOW + 60)])
def test_exception_expiry_values_are_refused(admin: Admin, expires_at: Any) -> None:
    body = {
        "spiffe_id": SUBJECT,
        "target": "tool:calc",
        "scopes": ["invoke"],
        "reason": "r",
        "expires_at": expires_at,
    }
    with pytest.raises(InvalidRequest, match="expires_at"):
        admin.grant_exception(ADMIN_CALLER, body, request_id="r", now=NOW)


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("listen: {port: .nan}\n", "listen.port"),
        ("listen: {port: " + HUGER + "}\n", "listen.port"),
        ("server: {workers: " + HUGE + "}\n", "server.workers"),
        ("server: {workers: .inf}\n", "server.workers"),
        ("server: {max_body_bytes: 99999999999999999999}\n", "server.max_body_bytes"),
        ("server: {header_timeout: " + HUGE + "}\n", "server.header_timeout"),
        ("server: {max_connections: " + HUGE + "}\n", "server.max_connections"),
        ("limits: {anonymous_refusals_per_minute: " + HUGE + "}\n", "limits.anonymous_refusals_per_minute"),
        ("tokens: {max_ttl: .inf}\n", "tokens.max_ttl"),
        ("tokens: {max_ttl: " + HUGE + "}\n", "tokens.max_ttl"),
        ("tokens: {max_ttl: '" + "9" * 30 + "d'}\n", "tokens.max_ttl"),
        ("tokens: {max_ttl: '" + HUGER + "s'}\n", "tokens.max_ttl"),
        ("tokens: {svid_leeway: -.inf}\n", "tokens.svid_leeway"),
        ("tasks: {max_ttl: " + HUGE + "}\n", "tasks.max_ttl"),
        ("keys: {rotate_after: 2024-13-45}\n", "keys.rotate_after"),
        ("issuer: 'http://[::1'\n", "issuer"),
        ("issuer: 'https://sts.example:99999'\n", "issuer"),
        ("listen: {tls: {cert: c.pem, key: k.pem, public_url: 'https://[::1'}}\n", "listen.tls.public_url"),
        ("store: {url: 'redis://[::1'}\n", "store.url"),
    ],
)
def test_config_refuses_non_finite_and_oversized_numbers(tmp_path: Path, yaml_text: str, key: str) -> None:
    path = tmp_path / "sts.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as refused:
        load_settings(path, environ={})
    message = str(refused.value)
    assert f"'{key}'" in message or key.rsplit(".", 1)[-1] in message
    assert "line 1" in message


def test_config_environment_value_too_large_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="STS_WORKERS"):
        load_settings(None, environ={"STS_WORKERS": HUGER})
    with pytest.raises(ConfigError, match="STS_LISTEN_PORT"):
        load_settings(None, environ={"STS_LISTEN_PORT": "2024-13-45"})


@pytest.mark.parametrize("value", [5, None, ["example.org"], b"example.org"])
def test_trust_domain_of_a_non_string_is_a_spiffe_id_error(value: Any) -> None:
    with pytest.raises(SpiffeIdError):
        TrustDomain.parse(value)
    with pytest.raises(SpiffeIdError):
        TrustDomain(value)


# --- the tester's requests over HTTP (sts serve) ----------------------------------------------------

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
AGENT = "spiffe://example.org/agent/researcher"


def _svid_for(authority: TestAuthority, sub: str, audience: str, claims: dict[str, str]) -> str:
    now = int(time.time())
    members = {"sub": json.dumps(sub), "aud": json.dumps(audience), "exp": str(now + 300), "iat": str(now)}
    header = {"alg": "ES256", "kid": authority.kid, "typ": "JWT"}
    assert isinstance(authority.private_key, ec.EllipticCurvePrivateKey)
    return sign_es256(authority.private_key, header, json_object(members | claims))


def post_token(server: RunningServer, data: dict[str, str], headers: dict[str, str] | None = None) -> Any:
    response = requests.post(f"{server.url}/token", data=data, headers=headers or {}, timeout=10)
    return response.status_code, response.json()


def _form(subject: str, **extra: str) -> dict[str, str]:
    return {
        "grant_type": GRANT,
        "subject_token": subject,
        "subject_token_type": JWT_TYPE,
        "scope": "invoke",
    } | extra


@pytest.mark.parametrize(
    "claims", [{"iat": "NaN"}, {"iat": HUGE}, {"htu": '"http://[::1"'}], ids=["iat-nan", "iat-huge", "htu"]
)
def test_http_crafted_dpop_proof_is_400_invalid_dpop_proof(
    server: RunningServer, example_org: TestAuthority, claims: dict[str, str]
) -> None:
    members = {"jti": json.dumps(secrets.token_urlsafe(8)), "htu": json.dumps(f"{server.issuer}/token")}
    proof = dpop_proof(members | claims, now=int(time.time()))
    form = _form(example_org.mint(AGENT, server.issuer), audience="tool:calc")
    status, body = post_token(server, form, {"DPoP": proof})
    assert (status, body["error"]) == (400, "invalid_dpop_proof")


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_http_svid_huge_time_claim_is_400_invalid_request(
    server: RunningServer, partner_test: TestAuthority, claim: str
) -> None:
    """A federated partner's key is enough to send one (issue 11)."""
    token = _svid_for(partner_test, "spiffe://partner.test/agent", server.issuer, {claim: HUGE})
    status, body = post_token(server, _form(token, audience="tool:web-search"))
    assert (status, body["error"]) == (400, "invalid_request"), body
    assert f"({claim})" in body["error_description"]


def test_http_client_assertion_huge_exp_is_invalid_client(
    server: RunningServer, example_org: TestAuthority
) -> None:
    form = _form(example_org.mint(AGENT, server.issuer), audience="tool:calc") | {
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe",
        "client_assertion": _svid_for(example_org, AGENT, server.issuer, {"exp": HUGE}),
    }
    status, body = post_token(server, form)
    assert (status, body["error"]) == (401, "invalid_client"), body
    assert "(exp)" in body["error_description"]


def test_http_malformed_resource_is_400_invalid_target(
    server: RunningServer, example_org: TestAuthority
) -> None:
    status, body = post_token(server, _form(example_org.mint(AGENT, server.issuer), resource="http://[::1"))
    assert (status, body["error"]) == (400, "invalid_target")


@pytest.mark.parametrize(
    ("path", "caller", "body", "field"),
    [
        (
            "/tasks",
            "spiffe://example.org/orchestrator",
            json_object(
                {
                    "assignee": json.dumps(AGENT),
                    "targets": '[{"target": "tool:calc", "scopes": ["invoke"]}]',
                    "purpose": '"\\ud800"',
                    "ttl_seconds": "60",
                }
            ),
            "purpose",
        ),
        ("/admin/revocations", ADMIN, '{"jti": "\\udc00", "reason": "stolen"}', "jti"),
        ("/admin/revocations", ADMIN, '{"jti": "j", "reason": "\\ud800"}', "reason"),
    ],
    ids=["task-purpose", "revocation-jti", "revocation-reason"],
)
def test_http_unpaired_surrogate_in_a_body_is_400_not_a_store_failure(
    server: RunningServer, example_org: TestAuthority, path: str, caller: str, body: str, field: str
) -> None:
    """``json.loads`` makes a lone surrogate of ``"\\ud800"``; SQLite cannot encode it (a 500 before)."""
    headers = {
        "Authorization": f"Bearer {example_org.mint(caller, server.issuer)}",
        "Content-Type": "application/json",
    }
    response = requests.post(f"{server.url}{path}", data=body.encode(), headers=headers, timeout=10)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_request"
    assert field in response.json()["error_description"]
