"""DPoP abuse (RFC 9449): proofs at ``POST /token`` (400 ``invalid_dpop_proof``) and at a resource server
(``sts.verify.TokenVerifier``, 401 ``invalid_dpop_proof``; a DPoP-bound token sent as Bearer is
``invalid_token``).

Proofs are built byte by byte and signed with keys the attacker holds, so a claim can be ``NaN``, a
400-digit integer or an unclosed IPv6 literal; each must be refused as a bad proof, never a 500.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from http.client import HTTPConnection
from typing import Any
from urllib.parse import urlencode

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm

from sts.binding import DpopKey, access_token_hash
from sts.verify import TokenVerifier
from tests.hostile.attacker import AGENT, Answer, b64, form, http, jws, part, raises, refused, unsigned
from tests.hostile.conftest import World


class Holder:
    """A client's DPoP key: :class:`sts.binding.DpopKey` for honest proofs, its private key for the rest."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | None = None) -> None:
        self.private_key = private_key or ec.generate_private_key(ec.SECP256R1())
        self.key = DpopKey(self.private_key)
        self.alg = self.key.alg

    def claims(self, url: str, **override: Any) -> dict[str, Any]:
        base: dict[str, Any] = {"jti": f"j-{time.time_ns()}", "htm": "POST", "htu": url, "iat": int(time.time())}
        base |= override
        return {k: v for k, v in base.items() if v is not _DROP}

    def header(self, **override: Any) -> dict[str, Any]:
        base: dict[str, Any] = {"typ": "dpop+jwt", "alg": self.alg, "jwk": self.key.public_jwk} | override
        return {k: v for k, v in base.items() if v is not _DROP}

    def proof(self, url: str, *, head: dict[str, Any] | str | None = None, body: dict[str, Any] | str | None = None, **claims: Any) -> str:
        return jws(
            self.header() if head is None else head,
            self.claims(url, **claims) if body is None else body,
            self.private_key,
            self.alg,
        )

    def raw(self, url: str, **literal: str) -> str:
        """A proof whose claims are exact JSON text (``iat`` may be ``NaN``)."""
        members = {
            "jti": json.dumps(f"j-{time.time_ns()}"),
            "htm": '"POST"',
            "htu": json.dumps(url),
            "iat": str(int(time.time())),
        } | literal
        text = "{" + ",".join(f'"{k}":{v}' for k, v in members.items()) + "}"
        return self.proof(url, body=text)


_DROP = object()


def _private_jwk(holder: Holder) -> dict[str, Any]:
    assert isinstance(holder.private_key, ec.EllipticCurvePrivateKey)
    d = holder.private_key.private_numbers().private_value.to_bytes(32, "big")
    return dict(holder.key.public_jwk) | {"d": b64(d)}


def _hmac_proof(holder: Holder, url: str) -> str:
    secret = json.dumps(holder.key.public_jwk).encode()
    return jws(holder.header(alg="HS256"), holder.claims(url), secret, "HS256")


def _other_curve(url: str) -> str:
    key = ec.generate_private_key(ec.SECP384R1())
    jwk = DpopKey(ec.generate_private_key(ec.SECP256R1())).public_jwk  # P-256 jwk, P-384 signature
    return jws({"typ": "dpop+jwt", "alg": "ES384", "jwk": jwk}, Holder().claims(url), key, "ES384")


def _p384_jwk(holder: Holder, url: str) -> str:
    key = ec.generate_private_key(ec.SECP384R1())
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return jws({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk}, holder.claims(url), key, "ES384")


def _eddsa_with_ec_jwk(holder: Holder, url: str) -> str:
    ed = ed25519.Ed25519PrivateKey.generate()
    return jws(holder.header(alg="EdDSA"), holder.claims(url), ed, "EdDSA")


def _bad_point(holder: Holder, url: str) -> str:
    jwk = dict(holder.key.public_jwk) | {"x": b64(b"\x01" * 32), "y": b64(b"\x02" * 32)}
    return holder.proof(url, head=holder.header(jwk=jwk))


def _replayed(w: World, holder: Holder, url: str) -> str:
    proof = holder.key.proof("POST", url)
    first = http("POST", url, data=form(w.svid(AGENT), audience="tool:calc", scope="invoke"), headers={"DPoP": proof})
    assert first.status == 200, first.text
    return proof


def _flattened(holder: Holder, url: str) -> str:
    h, p, s = holder.key.proof("POST", url).split(".")
    return json.dumps({"protected": h, "payload": p, "signature": s})


Proof = Callable[[World, Holder, str], str]


def P(case_id: str, build: Proof) -> Any:
    return pytest.param(build, id=case_id)


TOKEN_ENDPOINT_PROOFS = [
    # --- typ ---
    P("typ-missing", lambda w, h, u: h.proof(u, head=h.header(typ=_DROP))),
    P("typ-jwt", lambda w, h, u: h.proof(u, head=h.header(typ="JWT"))),
    P("typ-at+jwt", lambda w, h, u: h.proof(u, head=h.header(typ="at+jwt"))),
    P("typ-number", lambda w, h, u: h.proof(u, head=h.header(typ=1))),
    P("typ-with-space", lambda w, h, u: h.proof(u, head=h.header(typ="dpop+jwt "))),
    # --- alg ---
    P("alg-none", lambda w, h, u: unsigned(h.header(alg="none"), h.claims(u))),
    P("alg-none-with-real-signature", lambda w, h, u: ".".join([part(h.header(alg="none")), *h.key.proof("POST", u).split(".")[1:]])),
    P("alg-hs256-keyed-with-jwk", lambda w, h, u: _hmac_proof(h, u)),
    P("alg-rs256-claimed", lambda w, h, u: h.proof(u, head=h.header(alg="RS256"))),
    P("alg-es384-with-p256-key", lambda w, h, u: _other_curve(u)),
    P("alg-es256-with-p384-jwk", lambda w, h, u: _p384_jwk(h, u)),
    P("alg-eddsa-with-ec-jwk", lambda w, h, u: _eddsa_with_ec_jwk(h, u)),
    P("alg-missing", lambda w, h, u: h.proof(u, head=h.header(alg=_DROP))),
    P("alg-list", lambda w, h, u: h.proof(u, head=h.header(alg=["ES256"]))),
    # --- jwk ---
    P("jwk-with-private-key", lambda w, h, u: h.proof(u, head=h.header(jwk=_private_jwk(h)))),
    P("jwk-missing", lambda w, h, u: h.proof(u, head=h.header(jwk=_DROP))),
    P("jwk-string", lambda w, h, u: h.proof(u, head=h.header(jwk=json.dumps(h.key.public_jwk)))),
    P("jwk-symmetric", lambda w, h, u: h.proof(u, head=h.header(jwk={"kty": "oct", "k": b64(b"secret")}))),
    P("jwk-not-on-curve", lambda w, h, u: _bad_point(h, u)),
    P("jwk-missing-y", lambda w, h, u: h.proof(u, head=h.header(jwk={k: v for k, v in h.key.public_jwk.items() if k != "y"}))),
    P("jwk-kid-instead", lambda w, h, u: h.proof(u, head=h.header(jwk=_DROP, kid="some-key"))),
    P("jwk-x5c-instead", lambda w, h, u: h.proof(u, head=h.header(jwk=_DROP, x5c=["MIIB"]))),
    P("signed-by-another-key", lambda w, h, u: jws(h.header(), h.claims(u), ec.generate_private_key(ec.SECP256R1()), "ES256")),
    # --- htm ---
    P("htm-get", lambda w, h, u: h.proof(u, htm="GET")),
    P("htm-lowercase", lambda w, h, u: h.proof(u, htm="post")),
    P("htm-missing", lambda w, h, u: h.proof(u, htm=_DROP)),
    P("htm-list", lambda w, h, u: h.proof(u, htm=["POST"])),
    # --- htu ---
    P("htu-other-host", lambda w, h, u: h.proof(u, htu="https://elsewhere.example/token")),
    P("htu-other-path", lambda w, h, u: h.proof(u, htu=u.replace("/token", "/introspect"))),
    P("htu-other-port", lambda w, h, u: h.proof(u, htu="http://127.0.0.1:1/token")),
    P("htu-https-scheme", lambda w, h, u: h.proof(u, htu=u.replace("http://", "https://"))),
    P("htu-userinfo", lambda w, h, u: h.proof(u, htu=u.replace("http://", "http://user@"))),
    P("htu-ipv6-unclosed", lambda w, h, u: h.proof(u, htu="http://[::1")),
    P("htu-ipv6-unclosed-with-path", lambda w, h, u: h.proof(u, htu="http://[::1/token")),
    P("htu-bad-port", lambda w, h, u: h.proof(u, htu="http://127.0.0.1:99999999999/token")),
    P("htu-relative", lambda w, h, u: h.proof(u, htu="/token")),
    P("htu-number", lambda w, h, u: h.proof(u, htu=1)),
    P("htu-missing", lambda w, h, u: h.proof(u, htu=_DROP)),
    P("htu-nul", lambda w, h, u: h.proof(u, htu=u + "\u0000")),
    # --- iat ---
    P("iat-stale", lambda w, h, u: h.proof(u, iat=int(time.time()) - 600)),
    P("iat-future", lambda w, h, u: h.proof(u, iat=int(time.time()) + 600)),
    P("iat-missing", lambda w, h, u: h.proof(u, iat=_DROP)),
    P("iat-NaN", lambda w, h, u: h.raw(u, iat="NaN")),
    P("iat-Infinity", lambda w, h, u: h.raw(u, iat="Infinity")),
    P("iat-minus-Infinity", lambda w, h, u: h.raw(u, iat="-Infinity")),
    P("iat-1e400", lambda w, h, u: h.raw(u, iat="1e400")),
    P("iat-400-digits", lambda w, h, u: h.raw(u, iat="1" * 400)),
    P("iat-minus-400-digits", lambda w, h, u: h.raw(u, iat="-" + "1" * 400)),
    P("iat-string", lambda w, h, u: h.proof(u, iat=str(int(time.time())))),
    P("iat-true", lambda w, h, u: h.proof(u, iat=True)),
    P("iat-null", lambda w, h, u: h.proof(u, iat=None)),
    # --- jti ---
    P("jti-replayed", _replayed),
    P("jti-missing", lambda w, h, u: h.proof(u, jti=_DROP)),
    P("jti-empty", lambda w, h, u: h.proof(u, jti="")),
    P("jti-huge", lambda w, h, u: h.proof(u, jti="j" * 300)),
    P("jti-number", lambda w, h, u: h.proof(u, jti=12345)),
    # --- shape ---
    P("not-a-jwt", lambda w, h, u: "garbage"),
    P("empty", lambda w, h, u: ""),
    P("two-proofs-comma-joined", lambda w, h, u: h.key.proof("POST", u) + ", " + h.key.proof("POST", u)),
    P("oversized", lambda w, h, u: h.proof(u, pad="p" * 5000)),
    P("json-serialization", lambda w, h, u: _flattened(h, u)),
    P("duplicate-iat", lambda w, h, u: h.proof(u, body=json.dumps(h.claims(u)).replace("{", '{"iat":1,', 1))),
    P("claims-not-object", lambda w, h, u: h.proof(u, body="[1]")),
    P("eddsa-signed-by-another-key", lambda w, h, u: jws(Holder(ed25519.Ed25519PrivateKey.generate()).header(), h.claims(u), ed25519.Ed25519PrivateKey.generate(), "EdDSA")),
]


@pytest.mark.parametrize("build", TOKEN_ENDPOINT_PROOFS)
def test_bad_dpop_proof_at_the_token_endpoint(world: World, build: Proof) -> None:
    url = f"{world.issuer}/token"
    proof = build(world, Holder(), url)
    body = form(world.svid(AGENT), audience="tool:calc", scope="invoke")
    refused(http("POST", url, data=body, headers={"DPoP": proof}, session=world.session), 400, "invalid_dpop_proof")


def test_two_dpop_headers_at_the_token_endpoint(world: World) -> None:
    """Two separate DPoP header lines (not a comma-joined value): exactly one proof is allowed."""
    holder = Holder()
    url = f"{world.issuer}/token"
    body = urlencode(form(world.svid(AGENT), audience="tool:calc", scope="invoke"))
    connection = HTTPConnection("127.0.0.1", world.port, timeout=10)
    try:
        connection.putrequest("POST", "/token")
        connection.putheader("Content-Type", "application/x-www-form-urlencoded")
        connection.putheader("Content-Length", str(len(body)))
        connection.putheader("DPoP", holder.key.proof("POST", url))
        connection.putheader("DPoP", holder.key.proof("POST", url))
        connection.endheaders(body.encode())
        response = connection.getresponse()
        payload = json.loads(response.read() or b"{}")
        status = response.status
    finally:
        connection.close()
    refused(Answer(status, payload, text=json.dumps(payload)), 400, "invalid_dpop_proof")


# --- at a resource server: the verifier library ---------------------------------------------------

RESOURCE = "https://calc.internal/compute"


@pytest.fixture(scope="module")
def bound(world: World) -> tuple[str, Holder]:
    """A DPoP-bound tool:calc token and the key it is bound to."""
    holder = Holder()
    proof = holder.key.proof("POST", f"{world.issuer}/token")
    response = requests.post(
        f"{world.url}/token",
        data=form(world.svid(AGENT), audience="tool:calc", scope="invoke"),
        headers={"DPoP": proof},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"]), holder


@pytest.fixture(scope="module")
def calc_verifier(world: World) -> TokenVerifier:
    return TokenVerifier.without_revocation_check(issuer=world.issuer, audience="tool:calc", token_class="tool")


def _rs(holder: Holder, token: str, **claims: Any) -> str:
    return holder.proof(RESOURCE, htm="GET", htu=RESOURCE, ath=access_token_hash(token), **claims)


def _rs_raw(holder: Holder, token: str, **literal: str) -> str:
    return holder.raw(RESOURCE, htm='"GET"', ath=json.dumps(access_token_hash(token)), **literal)


ResourceProof = Callable[[str, Holder], tuple[str, str | None]]  # → (scheme, proof)


def R(case_id: str, build: ResourceProof, error: str = "invalid_dpop_proof", status: int = 401) -> Any:
    return pytest.param(build, error, status, id=case_id)


RESOURCE_CASES = [
    R("no-proof", lambda t, h: ("DPoP", None)),
    R("ath-missing", lambda t, h: ("DPoP", h.proof(RESOURCE, htm="GET"))),
    R("ath-of-another-token", lambda t, h: ("DPoP", h.proof(RESOURCE, htm="GET", ath=b64(b"x" * 32)))),
    R("proof-for-another-key", lambda t, h: ("DPoP", _rs(Holder(), t))),
    R("htu-other-resource", lambda t, h: ("DPoP", h.proof(RESOURCE, htm="GET", htu="https://calc.internal/other", ath=_ath(t)))),
    R("htm-post", lambda t, h: ("DPoP", h.proof(RESOURCE, htm="POST", ath=_ath(t)))),
    R("htu-ipv6-unclosed", lambda t, h: ("DPoP", h.proof(RESOURCE, htm="GET", htu="http://[::1", ath=_ath(t)))),
    R("iat-NaN", lambda t, h: ("DPoP", _rs_raw(h, t, iat="NaN"))),
    R("iat-400-digits", lambda t, h: ("DPoP", _rs_raw(h, t, iat="9" * 400))),
    R("iat-1e400", lambda t, h: ("DPoP", _rs_raw(h, t, iat="1e400"))),
    R("iat-stale", lambda t, h: ("DPoP", _rs(h, t, iat=int(time.time()) - 600))),
    R("typ-jwt", lambda t, h: ("DPoP", h.proof(RESOURCE, head=h.header(typ="JWT"), htm="GET", ath=_ath(t)))),
    R("alg-none", lambda t, h: ("DPoP", unsigned(h.header(alg="none"), h.claims(RESOURCE, htm="GET", ath=_ath(t))))),
    R("garbage-proof", lambda t, h: ("DPoP", "garbage")),
    R("sent-as-bearer", lambda t, h: ("Bearer", None), "invalid_token"),
    R("sent-as-bearer-with-proof", lambda t, h: ("Bearer", _rs(h, t)), "invalid_token"),
]


def _ath(token: str) -> str:
    return access_token_hash(token)


@pytest.mark.parametrize(("build", "error", "status"), RESOURCE_CASES)
def test_bad_dpop_proof_at_a_resource_server(
    calc_verifier: TokenVerifier, bound: tuple[str, Holder], build: ResourceProof, error: str, status: int
) -> None:
    token, holder = bound
    scheme, proof = build(token, holder)
    raises(
        lambda: calc_verifier.verify_request(
            authorization=f"{scheme} {token}", dpop=[proof] if proof else [], method="GET", url=RESOURCE
        ),
        status,
        error,
    )


def test_replayed_proof_at_a_resource_server(calc_verifier: TokenVerifier, bound: tuple[str, Holder]) -> None:
    token, holder = bound
    proof = _rs(holder, token)
    calc_verifier.verify_request(authorization=f"DPoP {token}", dpop=[proof], method="GET", url=RESOURCE)
    raises(
        lambda: calc_verifier.verify_request(authorization=f"DPoP {token}", dpop=[proof], method="GET", url=RESOURCE),
        401,
        "invalid_dpop_proof",
    )


def test_two_proofs_at_a_resource_server(calc_verifier: TokenVerifier, bound: tuple[str, Holder]) -> None:
    token, holder = bound
    raises(
        lambda: calc_verifier.verify_request(
            authorization=f"DPoP {token}", dpop=[_rs(holder, token), _rs(holder, token)], method="GET", url=RESOURCE
        ),
        401,
        "invalid_dpop_proof",
    )
