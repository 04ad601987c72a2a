"""JWT-SVID verification: every rule of JWT-SVID.md, in order, each with its own refusals; time is frozen."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import serialization
from jwt.algorithms import ECAlgorithm

from sts.errors import InvalidToken, TemporarilyUnavailable
from sts.spiffeid import SpiffeId, TrustDomain
from sts.svid import RULES, UNVERIFIABLE, JwtSvidVerifier
from sts.trust import TrustBundle, TrustStore
from tests.authority import TestAuthority, b64url, forge, hmac_token, public_jwk, trust_store

NOW = 1_750_000_000
AUD = "https://sts.example.org"
SUB = "spiffe://example.org/agent/researcher"
LEEWAY = 30


@pytest.fixture(scope="module")
def rsa_authority() -> TestAuthority:
    """RSA key generation is slow; this authority is never rotated, so tests may share it."""
    return TestAuthority("rsa.test", alg="RS256")


@dataclass
class World:
    """``a`` and ``b`` are trusted (``b`` is a federated domain), ``evil`` is not; ``rsa`` is trusted."""

    a: TestAuthority
    b: TestAuthority
    evil: TestAuthority
    rsa: TestAuthority
    verifier: JwtSvidVerifier

    def mint(self, **kwargs: object) -> str:
        """A valid token from ``a`` for ``SUB`` and ``AUD`` at ``NOW``, changed by ``kwargs``."""
        return self.a.mint(str(kwargs.pop("sub", SUB)), kwargs.pop("aud", AUD), now=NOW, **kwargs)

    def claims(self, **changes: object) -> dict[str, object]:
        return {"sub": SUB, "aud": AUD, "exp": NOW + 300, "iat": NOW} | changes

    def header(self, **changes: object) -> dict[str, object]:
        return {"alg": "ES256", "kid": self.a.kid, "typ": "JWT"} | changes


@pytest.fixture
def world(rsa_authority: TestAuthority) -> World:
    a, b, evil = TestAuthority("example.org"), TestAuthority("partner.test"), TestAuthority("evil.test")
    return World(a, b, evil, rsa_authority, JwtSvidVerifier(trust_store(a, b, rsa_authority), AUD))


def verify(world: World, token: str, *, now: float = NOW) -> object:
    return world.verifier.verify(token, now=now)


def refusal(world: World, token: str, *, now: float = NOW) -> InvalidToken:
    with pytest.raises(InvalidToken) as excinfo:
        world.verifier.verify(token, now=now)
    return excinfo.value


def swap_payload(token: str, claims: dict[str, object]) -> str:
    header, _, signature = token.split(".")
    return f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"


def raw(header: bytes, payload: bytes, signature: bytes = b"sig") -> str:
    return ".".join(b64url(part) for part in (header, payload, signature))


# --- Accepted tokens -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alg",
    ["ES256", "ES384", "ES512", "RS256", "PS256", "RS512", "PS384"],
)
def test_accepts_each_jwt_svid_algorithm(alg: str) -> None:
    authority = TestAuthority(alg=alg)
    verifier = JwtSvidVerifier(trust_store(authority), AUD)
    svid = verifier.verify(authority.mint(SUB, AUD, now=NOW), now=NOW)
    assert svid.spiffe_id == SpiffeId.parse(SUB)


def test_result_carries_identity_audience_times_and_hash(world: World) -> None:
    token = world.mint(extra_claims={"act": {"sub": "spiffe://example.org/user"}})
    svid = world.verifier.verify(token, now=NOW)
    assert svid.spiffe_id == SpiffeId.parse(SUB)
    assert svid.audience == (AUD,)
    assert svid.expiry == NOW + 300
    assert svid.issued_at == NOW
    assert svid.claims["act"] == {"sub": "spiffe://example.org/user"}
    assert svid.token_hash == hashlib.sha256(token.encode()).hexdigest()
    with pytest.raises(TypeError):
        svid.claims["sub"] = "spiffe://example.org/admin"  # type: ignore[index]


@pytest.mark.parametrize(
    ("mint_kwargs", "audience"),
    [
        ({"aud": AUD}, (AUD,)),
        ({"aud": [AUD]}, (AUD,)),
        ({"aud": ["https://other.example", AUD]}, ("https://other.example", AUD)),
    ],
    ids=["aud-string", "aud-list-of-one", "aud-list-with-another"],
)
def test_accepts_audience_forms(
    world: World, mint_kwargs: dict[str, object], audience: tuple[str, ...]
) -> None:
    """JWT-SVID.md §3.2 / RFC 7519 §4.1.3: a string or a list of strings holding ours."""
    assert world.verifier.verify(world.mint(**mint_kwargs), now=NOW).audience == audience


ACCEPTED: list[tuple[str, Callable[[World], str], float]] = [
    ("typ-absent", lambda w: w.mint(header={"typ": None}), NOW),
    ("typ-jose", lambda w: w.mint(header={"typ": "JOSE"}), NOW),
    ("iat-absent", lambda w: w.mint(omit=("iat",)), NOW),
    (
        "iss-and-jti-allowed",
        lambda w: w.mint(extra_claims={"iss": "spiffe://example.org/spire", "jti": "1"}),
        NOW,
    ),
    ("exp-just-inside-leeway", lambda w: w.mint(ttl=0), NOW + LEEWAY - 1),
    ("nbf-at-leeway-edge", lambda w: w.mint(extra_claims={"nbf": NOW + LEEWAY}), NOW),
    ("iat-at-leeway-edge", lambda w: w.mint(extra_claims={"iat": NOW + LEEWAY}), NOW),
    ("fractional-times", lambda w: w.mint(extra_claims={"exp": NOW + 0.5, "nbf": NOW - 0.5}), NOW),
    ("federated-trust-domain", lambda w: w.b.mint("spiffe://partner.test/agent", AUD, now=NOW), NOW),
]


@pytest.mark.parametrize(("make", "now"), [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_accepts_boundary(world: World, make: Callable[[World], str], now: float) -> None:
    world.verifier.verify(make(world), now=now)


def test_rotated_bundle_accepts_old_and_new_keys(world: World) -> None:
    old_token = world.mint()
    world.a.rotate()
    new_token = world.mint()
    assert json.loads(base64.urlsafe_b64decode(new_token.split(".")[0] + "=="))["kid"] == world.a.kid
    world.verifier.verify(old_token, now=NOW)
    world.verifier.verify(new_token, now=NOW)


def test_size_limit_is_inclusive(world: World) -> None:
    token = world.mint()
    trust = trust_store(world.a)
    JwtSvidVerifier(trust, AUD, max_token_bytes=len(token)).verify(token, now=NOW)
    with pytest.raises(InvalidToken, match="larger"):
        JwtSvidVerifier(trust, AUD, max_token_bytes=len(token) - 1).verify(token, now=NOW)


# --- Refusals: one table, every rule -------------------------------------------------------------------

Case = tuple[str, str, Callable[[World], str], float]


def _public_pem(w: World) -> bytes:
    return w.a.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _public_der(w: World) -> bytes:
    return w.a.public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _embedded_jwk(w: World) -> str:
    """The attacker signs with its own key and embeds it as ``jwk`` under a kid the bundle knows."""
    return w.evil.mint(SUB, AUD, now=NOW, header={"kid": w.a.kid, "jwk": public_jwk(w.evil.public_key)})


CASES: list[Case] = [
    # 1. size: checked before any parsing.
    ("size-oversized", "size", lambda w: w.mint(extra_claims={"pad": "x" * 9000}), NOW),
    ("size-oversized-garbage", "size", lambda w: "." * 10_000, NOW),
    # 2. malformed: compact JWS of three strict base64url parts, JSON objects.
    ("malformed-empty", "malformed", lambda w: "", NOW),
    ("malformed-garbage", "malformed", lambda w: "not a token", NOW),
    ("malformed-two-parts", "malformed", lambda w: w.mint().rsplit(".", 1)[0], NOW),
    ("malformed-four-parts", "malformed", lambda w: w.mint() + ".AAAA", NOW),
    ("malformed-jwe-five-parts", "malformed", lambda w: "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d", NOW),
    (
        "malformed-json-serialization",
        "malformed",
        lambda w: json.dumps({"payload": "e30", "signatures": [{"protected": "e30", "signature": "AA"}]}),
        NOW,
    ),
    ("malformed-padding", "malformed", lambda w: w.mint().replace(".", "=.", 1), NOW),
    ("malformed-std-base64-alphabet", "malformed", lambda w: "+" + w.mint()[1:], NOW),
    ("malformed-whitespace", "malformed", lambda w: w.mint() + "\n", NOW),
    ("malformed-non-canonical-base64", "malformed", lambda w: w.mint().rsplit(".", 1)[0] + ".AB", NOW),
    ("malformed-non-ascii", "malformed", lambda w: w.mint()[:-1] + "é", NOW),
    ("malformed-header-not-json", "malformed", lambda w: raw(b"not json", b"{}"), NOW),
    ("malformed-header-not-object", "malformed", lambda w: raw(b'["ES256"]', b"{}"), NOW),
    ("malformed-header-not-utf8", "malformed", lambda w: raw(b'{"alg":"\xff"}', b"{}"), NOW),
    ("malformed-payload-not-object", "malformed", lambda w: raw(b'{"alg":"ES256"}', b'"x"'), NOW),
    ("malformed-payload-empty", "malformed", lambda w: raw(b'{"alg":"ES256"}', b""), NOW),
    (
        "malformed-duplicate-header-member",
        "malformed",
        lambda w: raw(b'{"alg":"none","alg":"ES256","kid":"k"}', b"{}"),
        NOW,
    ),
    (
        "malformed-duplicate-sub-claim",
        "malformed",
        lambda w: raw(
            b'{"alg":"ES256","kid":"k"}', f'{{"sub":"{SUB}","sub":"spiffe://evil.test/x"}}'.encode()
        ),
        NOW,
    ),
    ("malformed-exp-infinity", "malformed", lambda w: raw(b'{"alg":"ES256"}', b'{"exp":Infinity}'), NOW),
    (
        "malformed-deeply-nested-json",
        "malformed",
        lambda w: raw(b'{"alg":"ES256"}', b'{"a":' + b"[" * 1500 + b"]" * 1500 + b"}"),
        NOW,
    ),
    # 3. alg: only RS/ES/PS 256/384/512, whatever the key.
    ("alg-none-unsigned", "alg", lambda w: forge(w.header(alg="none"), w.claims()), NOW),
    ("alg-none-with-signature", "alg", lambda w: forge(w.header(alg="none"), w.claims(), b"s" * 64), NOW),
    ("alg-None-capitalised", "alg", lambda w: forge(w.header(alg="None"), w.claims()), NOW),
    (
        "alg-hs256-public-key-pem",
        "alg",
        lambda w: hmac_token(w.header(alg="HS256"), w.claims(), _public_pem(w)),
        NOW,
    ),
    (
        "alg-hs256-public-key-der",
        "alg",
        lambda w: hmac_token(w.header(alg="HS256"), w.claims(), _public_der(w)),
        NOW,
    ),
    ("alg-hs384", "alg", lambda w: forge(w.header(alg="HS384"), w.claims(), b"s" * 48), NOW),
    ("alg-hs512", "alg", lambda w: forge(w.header(alg="HS512"), w.claims(), b"s" * 64), NOW),
    ("alg-eddsa", "alg", lambda w: forge(w.header(alg="EdDSA"), w.claims(), b"s" * 64), NOW),
    ("alg-es256k", "alg", lambda w: forge(w.header(alg="ES256K"), w.claims(), b"s" * 64), NOW),
    ("alg-lowercase", "alg", lambda w: w.mint(header={"alg": "es256"}), NOW),
    ("alg-missing", "alg", lambda w: w.mint(omit=("alg",)), NOW),
    ("alg-not-a-string", "alg", lambda w: w.mint(header={"alg": ["ES256"]}), NOW),
    # 4. typ: absent, JWT or JOSE.
    ("typ-at-jwt", "typ", lambda w: w.mint(header={"typ": "at+jwt"}), NOW),
    ("typ-lowercase", "typ", lambda w: w.mint(header={"typ": "jwt"}), NOW),
    ("typ-empty", "typ", lambda w: w.mint(header={"typ": ""}), NOW),
    ("typ-not-a-string", "typ", lambda w: w.mint(header={"typ": ["JWT"]}), NOW),
    # 5. crit: no extension is understood.
    ("crit-exp", "crit", lambda w: w.mint(header={"crit": ["exp"], "exp": NOW}), NOW),
    ("crit-empty-list", "crit", lambda w: w.mint(header={"crit": []}), NOW),
    ("crit-b64-unencoded-payload", "crit", lambda w: w.mint(header={"crit": ["b64"], "b64": False}), NOW),
    # JWT-SVID.md §2: alg, kid, typ only; correctly signed tokens carrying more are refused (issue 12 #8).
    ("header-jku", "header", lambda w: w.mint(header={"jku": "https://evil.test/jwks"}), NOW),
    ("header-x5u", "header", lambda w: w.mint(header={"x5u": "https://evil.test/c"}), NOW),
    ("header-x5c", "header", lambda w: w.mint(header={"x5c": ["AAAA"]}), NOW),
    ("header-jwk", "header", lambda w: w.mint(header={"jwk": public_jwk(w.a.public_key)}), NOW),
    ("header-cty", "header", lambda w: w.mint(header={"cty": "JWT"}), NOW),
    # 6. kid: required, a non-empty string.
    ("kid-missing", "kid", lambda w: w.mint(omit=("kid",)), NOW),
    ("kid-empty", "kid", lambda w: w.mint(header={"kid": ""}), NOW),
    ("kid-not-a-string", "kid", lambda w: w.mint(header={"kid": 1}), NOW),
    # 7. sub: a valid SPIFFE ID of a workload.
    ("sub-missing", "sub", lambda w: w.mint(omit=("sub",)), NOW),
    ("sub-not-a-string", "sub", lambda w: w.mint(extra_claims={"sub": ["spiffe://example.org/x"]}), NOW),
    ("sub-not-spiffe", "sub", lambda w: w.mint(sub="https://example.org/agent"), NOW),
    ("sub-uppercase-trust-domain", "sub", lambda w: w.mint(sub="spiffe://EXAMPLE.org/agent"), NOW),
    ("sub-trailing-slash", "sub", lambda w: w.mint(sub="spiffe://example.org/agent/"), NOW),
    ("sub-trailing-newline", "sub", lambda w: w.mint(sub="spiffe://example.org/agent\n"), NOW),
    ("sub-trust-domain-only", "sub", lambda w: w.mint(sub="spiffe://example.org"), NOW),
    # 8. trust_domain: no bundle → untrusted.
    (
        "trust-domain-attacker-signs-own-domain",
        "trust_domain",
        lambda w: w.evil.mint("spiffe://evil.test/agent", AUD, now=NOW),
        NOW,
    ),
    # 9. kid_unknown: the key comes only from the bundle of sub's trust domain.
    ("kid-unknown", "kid_unknown", lambda w: w.mint(header={"kid": "no-such-kid"}), NOW),
    (
        "kid-unknown-attacker-key-claims-our-domain",
        "kid_unknown",
        lambda w: w.evil.mint(SUB, AUD, now=NOW),
        NOW,
    ),
    (
        "kid-unknown-kid-from-another-trusted-domain",
        "kid_unknown",
        lambda w: w.a.mint("spiffe://partner.test/agent", AUD, now=NOW),
        NOW,
    ),
    # 10. key_mismatch: key type and curve must fit alg.
    ("key-mismatch-ec-key-rs256", "key_mismatch", lambda w: w.mint(header={"alg": "RS256"}), NOW),
    ("key-mismatch-p256-key-es384", "key_mismatch", lambda w: w.mint(header={"alg": "ES384"}), NOW),
    (
        "key-mismatch-rsa-key-es256",
        "key_mismatch",
        lambda w: w.rsa.mint("spiffe://rsa.test/agent", AUD, now=NOW, header={"alg": "ES256"}),
        NOW,
    ),
    # 11. signature.
    ("signature-empty", "signature", lambda w: w.mint().rsplit(".", 1)[0] + ".", NOW),
    ("signature-truncated", "signature", lambda w: w.mint().rsplit(".", 1)[0] + "." + b64url(b"x" * 63), NOW),
    (
        "signature-payload-swapped",
        "signature",
        lambda w: swap_payload(w.mint(), w.claims(sub=SUB + "x")),
        NOW,
    ),
    ("header-embedded-jwk-of-an-impostor", "header", _embedded_jwk, NOW),
    (
        "signature-pkcs1-presented-as-pss",
        "signature",
        lambda w: w.rsa.mint("spiffe://rsa.test/agent", AUD, now=NOW, header={"alg": "PS256"}),
        NOW,
    ),
    # 12. aud: present, a string or non-empty list of strings, ours among them.
    ("aud-missing", "aud", lambda w: w.mint(omit=("aud",)), NOW),
    ("aud-wrong", "aud", lambda w: w.mint(aud="https://other.example"), NOW),
    ("aud-list-without-ours", "aud", lambda w: w.mint(aud=["https://other.example"]), NOW),
    ("aud-empty-list", "aud", lambda w: w.mint(aud=[]), NOW),
    ("aud-empty-string", "aud", lambda w: w.mint(aud=""), NOW),
    ("aud-number", "aud", lambda w: w.mint(aud=1), NOW),
    ("aud-null", "aud", lambda w: w.mint(aud=None), NOW),
    ("aud-list-with-non-string", "aud", lambda w: w.mint(aud=[AUD, 1]), NOW),
    ("aud-object", "aud", lambda w: w.mint(aud={"aud": AUD}), NOW),
    ("aud-prefix-of-ours", "aud", lambda w: w.mint(aud=AUD + "/x"), NOW),
    # 13. exp: required number; expired from exp + leeway on.
    ("exp-missing", "exp", lambda w: w.mint(omit=("exp",)), NOW),
    ("exp-string", "exp", lambda w: w.mint(extra_claims={"exp": str(NOW + 300)}), NOW),
    ("exp-bool", "exp", lambda w: w.mint(extra_claims={"exp": True}), NOW),
    ("exp-null", "exp", lambda w: w.mint(extra_claims={"exp": None}), NOW),
    ("expired-at-leeway-edge", "expired", lambda w: w.mint(ttl=0), NOW + LEEWAY),
    ("expired-long-ago", "expired", lambda w: w.mint(), NOW + 3600),
    # 14. nbf / iat: not in the future beyond the leeway.
    ("nbf-future", "nbf", lambda w: w.mint(extra_claims={"nbf": NOW + LEEWAY + 1}), NOW),
    ("nbf-string", "nbf", lambda w: w.mint(extra_claims={"nbf": str(NOW)}), NOW),
    ("iat-future", "iat", lambda w: w.mint(extra_claims={"iat": NOW + LEEWAY + 1}), NOW),
    ("iat-bool", "iat", lambda w: w.mint(extra_claims={"iat": False}), NOW),
]


@pytest.mark.parametrize(("rule", "make", "now"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refuses(world: World, rule: str, make: Callable[[World], str], now: float) -> None:
    error = refusal(world, make(world), now=now)
    assert error.rule == rule, error.description
    assert error.error == "invalid_request"
    assert world.a.kid not in error.description, "descriptions never name the key id"


def test_every_rule_has_a_refusal_case() -> None:
    assert {case[1] for case in CASES} == set(RULES)


@pytest.mark.parametrize(
    ("case_id", "description"),
    [
        ("expired-long-ago", "token is expired"),
        ("aud-wrong", "audience does not include this server"),
        ("kid-unknown", UNVERIFIABLE),
        ("trust-domain-attacker-signs-own-domain", UNVERIFIABLE),
        ("signature-payload-swapped", UNVERIFIABLE),
        ("key-mismatch-ec-key-rs256", UNVERIFIABLE),
    ],
    ids=["expired", "audience", "unknown-key", "untrusted-domain", "signature", "key-mismatch"],
)
def test_descriptions_say_the_rule_in_words(world: World, case_id: str, description: str) -> None:
    _, _, make, now = next(c for c in CASES if c[0] == case_id)
    assert refusal(world, make(world), now=now).description == description


def test_jwe_and_json_serialization_are_named(world: World) -> None:
    assert "JWE" in refusal(world, "a.b.c.d.e").description
    assert "JSON serialization" in refusal(world, '{"payload": ""}').description


# --- Order and causes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "now", "rule"),
    [
        (lambda w: forge(w.header(alg="none"), w.claims(exp="x", aud=[])), NOW, "alg"),
        (lambda w: swap_payload(w.mint(), w.claims(aud="https://other.example")), NOW + 3600, "signature"),
        (lambda w: w.mint(aud="https://other.example"), NOW + 3600, "aud"),
        (lambda w: w.evil.mint("spiffe://evil.test/x", AUD, now=NOW, header={"typ": "x"}), NOW, "typ"),
    ],
    ids=[
        "alg-before-claims",
        "signature-before-claims-no-oracle",
        "aud-before-expiry",
        "header-before-trust-domain",
    ],
)
def test_first_failing_rule_wins(world: World, make: Callable[[World], str], now: float, rule: str) -> None:
    assert refusal(world, make(world), now=now).rule == rule


def test_invalid_sub_chains_the_parse_error(world: World) -> None:
    error = refusal(world, world.mint(sub="spiffe://EXAMPLE.org/x"))
    assert error.__cause__ is not None


def test_unavailable_bundle_propagates(world: World) -> None:
    class Down:
        trust_domain = TrustDomain("example.org")

        def current(self) -> TrustBundle:
            raise TemporarilyUnavailable("bundle not yet received")

    verifier = JwtSvidVerifier(TrustStore([Down()]), AUD)
    with pytest.raises(TemporarilyUnavailable):
        verifier.verify(world.mint(), now=NOW)


def test_revoked_bundle_refuses_every_token(world: World) -> None:
    """Bundle §4.1.3: an empty key set means all SVIDs of that trust domain are untrusted."""

    class Revoked:
        trust_domain = TrustDomain("example.org")

        def current(self) -> TrustBundle:
            return TrustBundle.from_spiffe_bundle(self.trust_domain, b'{"keys": []}')

    verifier = JwtSvidVerifier(TrustStore([Revoked()]), AUD)
    with pytest.raises(InvalidToken) as excinfo:
        verifier.verify(world.mint(), now=NOW)
    assert excinfo.value.rule == "kid_unknown"


def test_default_now_is_the_clock(world: World) -> None:
    world.verifier.verify(world.a.mint(SUB, AUD))
    with pytest.raises(InvalidToken, match="expired"):
        world.verifier.verify(world.mint())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"audience": ""}, "audience"),
        ({"audience": AUD, "leeway_seconds": -1}, "leeway"),
        ({"audience": AUD, "max_token_bytes": 0}, "max_token_bytes"),
    ],
    ids=["empty-audience", "negative-leeway", "zero-max-size"],
)
def test_verifier_refuses_bad_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        JwtSvidVerifier(TrustStore([]), **kwargs)  # type: ignore[arg-type]


def test_ec_key_of_each_curve_only_fits_its_alg() -> None:
    """ES512 needs P-521: a P-384 authority's token relabelled ES512 is a key mismatch."""
    authority = TestAuthority(alg="ES384")
    verifier = JwtSvidVerifier(trust_store(authority), AUD)
    token = authority.mint(SUB, AUD, now=NOW, header={"alg": "ES512"})
    with pytest.raises(InvalidToken) as excinfo:
        verifier.verify(token, now=NOW)
    assert excinfo.value.rule == "key_mismatch"


@pytest.mark.parametrize(
    "literal", ["1e400", "-1e400"], ids=["exp-overflows-to-inf", "exp-overflows-to-minus-inf"]
)
def test_non_finite_times_are_refused_not_crashing(world: World, literal: str) -> None:
    """JSON ``1e400`` parses to inf; a validly signed token carrying it must be refused, never a 500."""
    payload = f'{{"sub": "{SUB}", "aud": "{AUD}", "iat": {NOW}, "exp": {literal}}}'
    signing_input = f"{b64url(json.dumps(world.header()).encode())}.{b64url(payload.encode())}"
    signature = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input.encode(), world.a.private_key)
    assert refusal(world, f"{signing_input}.{b64url(signature)}", now=NOW).rule == "exp"


class SwappableSource:
    """A bundle source whose bundle the test replaces, as a rotation or redaction would."""

    def __init__(self, bundle: TrustBundle) -> None:
        self.bundle = bundle

    @property
    def trust_domain(self) -> TrustDomain:
        return self.bundle.trust_domain

    def current(self) -> TrustBundle:
        return self.bundle


def test_cached_svid_is_refused_once_its_key_leaves_the_bundle() -> None:
    """The verified-SVID cache never outlives the trust it was built on."""
    authority = TestAuthority("example.org")
    source = SwappableSource(authority.bundle())
    verifier = JwtSvidVerifier(TrustStore([source]), AUD)
    token = authority.mint(SUB, AUD, now=NOW)
    assert verifier.verify(token, now=NOW).spiffe_id == SpiffeId.parse(SUB)
    assert verifier.verify(token, now=NOW + 1).spiffe_id == SpiffeId.parse(SUB)  # served from the cache
    old_kid = authority.kid
    authority.rotate()
    rotated = TrustBundle.from_spiffe_bundle(authority.trust_domain, authority.spiffe_bundle())
    source.bundle = TrustBundle(
        rotated.trust_domain,
        {k: v for k, v in rotated.jwt_authorities.items() if k != old_kid},
        rotated.x509_authorities,
    )
    with pytest.raises(InvalidToken) as refused:
        verifier.verify(token, now=NOW + 2)
    assert refused.value.rule == "kid_unknown"


def test_cached_svid_still_expires() -> None:
    authority = TestAuthority("example.org")
    verifier = JwtSvidVerifier(TrustStore([SwappableSource(authority.bundle())]), AUD, leeway_seconds=0)
    token = authority.mint(SUB, AUD, now=NOW, ttl=10)
    verifier.verify(token, now=NOW)
    with pytest.raises(InvalidToken) as refused:
        verifier.verify(token, now=NOW + 10)
    assert refused.value.rule == "expired"
